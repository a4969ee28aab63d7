//! Building blocks for task execution (issue 4): running a configured command in its own
//! process group with a timeout, cancellation and capped, redacted output ([`process`]), and
//! one git worktree per attempt ([`worktree`]). The executor that takes tasks off the queue,
//! the lifecycle state machine and the saga log are not built yet.

pub mod process;
pub mod worktree;
