//! Audit-row contents. Sensitive fields are redacted here, before anything is written, keeping
//! their length so an auditor can still see that something was there: `[REDACTED (N characters)]`.

use mahavishnu::task::NewTask;
use serde_json::{json, Value};

/// Keys whose values are redacted wherever they appear in audit details.
const SECRET_LIKE: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "credential",
    "private_key",
    "cookie",
];

/// `[REDACTED (N characters)]`.
pub fn redacted(chars: usize) -> Value {
    Value::String(format!("[REDACTED ({chars} characters)]"))
}

/// True when a key looks like it holds a secret.
pub fn is_secret_like(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    SECRET_LIKE.iter().any(|s| k.contains(s))
}

/// Details of a `task_created` event: description and metadata redacted, secret-like keys
/// anywhere redacted too.
pub fn task_created_details(task: &NewTask, message_key: &str) -> Value {
    let metadata_chars = serde_json::to_string(&task.metadata)
        .map(|s| s.chars().count())
        .unwrap_or(0);
    let mut details = json!({
        "title": task.title,
        "repository": task.repository,
        "priority": task.priority.as_str(),
        "deadline": task.deadline,
        "tags": task.tags,
        "description": task.description.as_ref().map(|d| redacted(d.chars().count())),
        "metadata": redacted(metadata_chars),
        "message_key": message_key,
    });
    redact_secret_keys(&mut details);
    details
}

/// Replaces the value of every secret-like key, at any depth, iteratively.
pub fn redact_secret_keys(v: &mut Value) {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                for (k, val) in map.iter_mut() {
                    if !is_secret_like(k) {
                        stack.push(val);
                        continue;
                    }
                    let n = match &*val {
                        Value::String(s) => s.chars().count(),
                        other => other.to_string().chars().count(),
                    };
                    *val = redacted(n);
                }
            }
            Value::Array(a) => stack.extend(a.iter_mut()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mahavishnu::task::Priority;

    #[test]
    fn description_and_metadata_are_redacted_with_lengths() {
        let t = NewTask {
            title: "Deploy".into(),
            description: Some("top sécret".into()),
            repository: "core".into(),
            priority: Priority::High,
            deadline: None,
            metadata: json!({"k": "v"}),
            tags: vec![],
        };
        let d = task_created_details(&t, "api:ci:1");
        assert_eq!(d["description"], "[REDACTED (10 characters)]");
        assert_eq!(d["metadata"], "[REDACTED (9 characters)]");
        assert_eq!(d["title"], "Deploy");
        assert!(!d.to_string().contains("sécret"));
    }

    #[test]
    fn secret_like_keys_are_redacted_at_any_depth() {
        let mut v =
            json!({"a": {"GitHub_Token": "ghp_x", "list": [{"password": 1234}]}, "ok": "x"});
        redact_secret_keys(&mut v);
        assert_eq!(v["a"]["GitHub_Token"], "[REDACTED (5 characters)]");
        assert_eq!(v["a"]["list"][0]["password"], "[REDACTED (4 characters)]");
        assert_eq!(v["ok"], "x");
    }
}
