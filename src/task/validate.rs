//! Task validation. Pure functions: no I/O, the clock is passed in, so property tests can drive them.

use super::{NewTask, Priority, TaskRequest};
use crate::error::FieldError;
use chrono::{DateTime, Utc};

/// Bounds on task fields. The defaults are the documented API limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Characters in a title, after sanitising.
    pub title_max_chars: usize,
    /// Characters in a description.
    pub description_max_chars: usize,
    /// Characters in a repository name.
    pub repository_max_chars: usize,
    /// Serialised JSON bytes of the metadata object.
    pub metadata_max_bytes: usize,
    /// Nesting depth of the metadata object.
    pub metadata_max_depth: usize,
    /// Number of tags.
    pub tags_max: usize,
    /// Characters per tag.
    pub tag_max_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            title_max_chars: 200,
            description_max_chars: 5_000,
            repository_max_chars: 100,
            metadata_max_bytes: 16 * 1024,
            metadata_max_depth: 8,
            tags_max: 10,
            tag_max_chars: 50,
        }
    }
}

/// Removes NUL and every other control character (C0, DEL, C1) and trims surrounding whitespace.
pub fn sanitize_title(raw: &str) -> String {
    raw.chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .to_owned()
}

/// True for `^[A-Za-z0-9_-]{1,max}$`.
pub fn is_valid_repository(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Validates a request. `now` is when the task was accepted: the gateway passes its clock, a
/// worker passes the time JetStream stored the message, so a deadline that was in the future at
/// acceptance does not turn a queued task invalid.
///
/// Returns every problem found, not only the first.
pub fn validate(
    req: &TaskRequest,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<NewTask, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut bad = |field: &str, problem: String| {
        errors.push(FieldError {
            field: field.to_owned(),
            problem,
        })
    };

    let title = match &req.title {
        None => {
            bad("title", "is required".into());
            String::new()
        }
        Some(raw) => {
            let t = sanitize_title(raw);
            let n = t.chars().count();
            if n == 0 {
                bad(
                    "title",
                    "must contain at least one visible character".into(),
                );
            } else if n > limits.title_max_chars {
                bad(
                    "title",
                    format!(
                        "has {n} characters; at most {} are allowed",
                        limits.title_max_chars
                    ),
                );
            }
            t
        }
    };

    let description = req.description.as_ref().map(|d| d.replace('\0', ""));
    if let Some(d) = &description {
        let n = d.chars().count();
        if n > limits.description_max_chars {
            bad(
                "description",
                format!(
                    "has {n} characters; at most {} are allowed",
                    limits.description_max_chars
                ),
            );
        }
    }

    let repository = match &req.repository {
        None => {
            bad("repository", "is required".into());
            String::new()
        }
        Some(r) if !is_valid_repository(r, limits.repository_max_chars) => {
            bad(
                "repository",
                format!(
                    "must match ^[A-Za-z0-9_-]{{1,{}}}$",
                    limits.repository_max_chars
                ),
            );
            String::new()
        }
        Some(r) => r.clone(),
    };

    let priority = match req.priority.as_deref() {
        None => Priority::Medium,
        Some(p) => Priority::parse(p).unwrap_or_else(|| {
            bad(
                "priority",
                "must be one of low, medium, high, critical".into(),
            );
            Priority::Medium
        }),
    };

    let deadline = match req.deadline.as_deref() {
        None => None,
        Some(d) => match DateTime::parse_from_rfc3339(d) {
            Err(_) => {
                bad(
                    "deadline",
                    "must be an RFC 3339 timestamp such as 2030-01-31T12:00:00Z".into(),
                );
                None
            }
            Ok(d) => {
                let d = d.with_timezone(&Utc);
                if d <= now {
                    bad("deadline", "must lie in the future".into());
                }
                Some(d)
            }
        },
    };

    let metadata = match &req.metadata {
        None | Some(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
        Some(m @ serde_json::Value::Object(_)) => {
            let size = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
            if size > limits.metadata_max_bytes {
                bad(
                    "metadata",
                    format!(
                        "is {size} bytes as JSON; at most {} are allowed",
                        limits.metadata_max_bytes
                    ),
                );
            } else if depth(m) > limits.metadata_max_depth {
                bad(
                    "metadata",
                    format!("nests deeper than {} levels", limits.metadata_max_depth),
                );
            } else if contains_nul(m) {
                bad(
                    "metadata",
                    "must not contain the NUL character (\\u0000) in keys or strings".into(),
                );
            }
            m.clone()
        }
        Some(_) => {
            bad("metadata", "must be a JSON object".into());
            serde_json::Value::Object(Default::default())
        }
    };

    let mut tags: Vec<String> = Vec::new();
    if let Some(raw) = &req.tags {
        if raw.len() > limits.tags_max {
            bad(
                "tags",
                format!(
                    "has {} tags; at most {} are allowed",
                    raw.len(),
                    limits.tags_max
                ),
            );
        }
        for (i, t) in raw.iter().enumerate() {
            let t = sanitize_title(t);
            let n = t.chars().count();
            if n == 0 || n > limits.tag_max_chars {
                bad(
                    &format!("tags[{i}]"),
                    format!("must have 1 to {} visible characters", limits.tag_max_chars),
                );
            } else if !tags.contains(&t) {
                tags.push(t);
            }
        }
    }

    if errors.is_empty() {
        Ok(NewTask {
            title,
            description,
            repository,
            priority,
            deadline,
            metadata,
            tags,
        })
    } else {
        Err(errors)
    }
}

/// Nesting depth, iteratively so that hostile input cannot overflow the stack.
fn depth(v: &serde_json::Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            serde_json::Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            serde_json::Value::Object(o) => stack.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    max
}

fn contains_nul(v: &serde_json::Value) -> bool {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::String(s) if s.contains('\0') => return true,
            serde_json::Value::Array(a) => stack.extend(a.iter()),
            serde_json::Value::Object(o) => {
                if o.keys().any(|k| k.contains('\0')) {
                    return true;
                }
                stack.extend(o.values());
            }
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn req(title: &str, repo: &str) -> TaskRequest {
        TaskRequest {
            title: Some(title.into()),
            repository: Some(repo.into()),
            ..Default::default()
        }
    }

    fn fields(r: Result<NewTask, Vec<FieldError>>) -> Vec<String> {
        r.err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn minimal_task_gets_defaults() {
        let t = validate(&req("Fix it", "core"), &Limits::default(), Utc::now()).unwrap();
        assert_eq!(t.priority, Priority::Medium);
        assert_eq!(t.metadata, json!({}));
        assert!(t.tags.is_empty());
    }

    #[test]
    fn title_is_sanitised_and_bounded() {
        let t = validate(
            &req("  a\0b\u{7}c\u{9f}  ", "r"),
            &Limits::default(),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(t.title, "abc");
        assert_eq!(
            fields(validate(
                &req("\0\u{1}", "r"),
                &Limits::default(),
                Utc::now()
            )),
            ["title"]
        );
        let ok = "é".repeat(200);
        assert!(validate(&req(&ok, "r"), &Limits::default(), Utc::now()).is_ok());
        let long = "é".repeat(201);
        assert_eq!(
            fields(validate(&req(&long, "r"), &Limits::default(), Utc::now())),
            ["title"]
        );
    }

    #[test]
    fn repository_must_match_pattern() {
        for bad in ["", "a b", "a/b", "ä", "a.b", &"x".repeat(101)] {
            assert_eq!(
                fields(validate(&req("t", bad), &Limits::default(), Utc::now())),
                ["repository"],
                "{bad:?}"
            );
        }
        assert!(validate(&req("t", &"x".repeat(100)), &Limits::default(), Utc::now()).is_ok());
        assert!(validate(&req("t", "A-z_09"), &Limits::default(), Utc::now()).is_ok());
    }

    #[test]
    fn reports_every_problem_at_once() {
        let r = TaskRequest {
            priority: Some("urgent".into()),
            deadline: Some("tomorrow".into()),
            metadata: Some(json!([1])),
            description: Some("d".repeat(5001)),
            ..Default::default()
        };
        let mut f = fields(validate(&r, &Limits::default(), Utc::now()));
        f.sort();
        assert_eq!(
            f,
            [
                "deadline",
                "description",
                "metadata",
                "priority",
                "repository",
                "title"
            ]
        );
    }

    #[test]
    fn deadline_must_be_after_acceptance_time() {
        let now = Utc::now();
        let mut r = req("t", "r");
        r.deadline = Some((now + chrono::Duration::seconds(5)).to_rfc3339());
        assert!(validate(&r, &Limits::default(), now).is_ok());
        assert_eq!(
            fields(validate(
                &r,
                &Limits::default(),
                now + chrono::Duration::seconds(6)
            )),
            ["deadline"]
        );
    }

    #[test]
    fn metadata_bounds_and_nul() {
        let mut r = req("t", "r");
        r.metadata = Some(json!({"k": "a\u{0}b"}));
        assert_eq!(
            fields(validate(&r, &Limits::default(), Utc::now())),
            ["metadata"]
        );
        let mut deep = json!(1);
        for _ in 0..20 {
            deep = json!({ "d": deep });
        }
        r.metadata = Some(deep);
        assert_eq!(
            fields(validate(&r, &Limits::default(), Utc::now())),
            ["metadata"]
        );
        r.metadata = Some(json!({"big": "x".repeat(20_000)}));
        assert_eq!(
            fields(validate(&r, &Limits::default(), Utc::now())),
            ["metadata"]
        );
    }

    #[test]
    fn description_nul_is_removed() {
        let mut r = req("t", "r");
        r.description = Some("a\0b".into());
        assert_eq!(
            validate(&r, &Limits::default(), Utc::now())
                .unwrap()
                .description
                .as_deref(),
            Some("ab")
        );
    }

    proptest! {
        #[test]
        fn never_panics_and_accepted_tasks_respect_the_rules(
            title in proptest::option::of(any::<String>()),
            description in proptest::option::of(any::<String>()),
            repository in proptest::option::of("[A-Za-z0-9_\\-./ ]{0,120}"),
            priority in proptest::option::of(any::<String>()),
            deadline in proptest::option::of(any::<String>()),
            tags in proptest::option::of(proptest::collection::vec(any::<String>(), 0..14)),
        ) {
            let r = TaskRequest { title, description, repository, priority, deadline, metadata: None, tags };
            if let Ok(t) = validate(&r, &Limits::default(), Utc::now()) {
                let n = t.title.chars().count();
                prop_assert!((1..=200).contains(&n));
                prop_assert!(!t.title.chars().any(char::is_control));
                prop_assert!(is_valid_repository(&t.repository, 100));
                prop_assert!(t.description.as_ref().is_none_or(|d| !d.contains('\0') && d.chars().count() <= 5000));
                prop_assert!(t.tags.len() <= 10);
            }
        }
    }
}
