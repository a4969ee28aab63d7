//! Routing: from a verified delivery (scheme, event, JSON payload) to the task a rule promises.
//! Pure functions over parsed JSON, so they are unit- and property-tested without I/O.
//!
//! A rule matches when its `event` equals the delivery's event and every non-empty filter has a
//! hit: `actions` (GitHub `action`, GitLab `object_attributes.action`, Standard `data.action`),
//! `labels` (any label on the issue or pull/merge request, or the label just added) and
//! `branches` (push ref, pull request base, merge request target; `$default` is the repository's
//! default branch). The first matching rule in configuration order wins.

use crate::config::{WebhookRule, WebhookScheme, WebhookTaskTemplate};
use crate::task::{Priority, TaskRequest};
use serde_json::Value;

/// What routing decided for one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// A rule matched and rendered this task request (still to be validated like any task).
    Task {
        /// The rule's name.
        rule: String,
        /// The rendered request.
        request: TaskRequest,
    },
    /// No rule matched: recorded and acknowledged, no task.
    NoMatch,
    /// A rule matched but its template could not be rendered from this payload.
    Invalid {
        /// The rule's name.
        rule: String,
        /// What was missing or wrong.
        reason: String,
    },
}

/// The event name of a delivery: the header's, or for Standard Webhooks the body's `type`.
pub fn event_of(scheme: WebhookScheme, header_event: &str, payload: &Value) -> String {
    match scheme {
        WebhookScheme::Standard if header_event.is_empty() => payload
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        _ => header_event.to_owned(),
    }
}

/// Routes a delivery through `rules`.
pub fn route(
    scheme: WebhookScheme,
    event: &str,
    payload: &Value,
    rules: &[WebhookRule],
) -> Verdict {
    for rule in rules {
        if rule.event != event || !matches_filters(scheme, rule, payload) {
            continue;
        }
        return match render_task(&rule.task, payload) {
            Ok(mut request) => {
                let mut meta = serde_json::Map::new();
                if let Some(a) = &rule.task.action {
                    meta.insert("action".into(), Value::String(a.clone()));
                }
                meta.insert("webhook_rule".into(), Value::String(rule.name.clone()));
                request.metadata = Some(Value::Object(meta));
                Verdict::Task {
                    rule: rule.name.clone(),
                    request,
                }
            }
            Err(reason) => Verdict::Invalid {
                rule: rule.name.clone(),
                reason,
            },
        };
    }
    Verdict::NoMatch
}

fn matches_filters(scheme: WebhookScheme, rule: &WebhookRule, p: &Value) -> bool {
    if !rule.actions.is_empty() {
        let action = match scheme {
            WebhookScheme::Github => lookup(p, "action"),
            WebhookScheme::Gitlab => lookup(p, "object_attributes.action"),
            WebhookScheme::Standard => lookup(p, "data.action"),
        }
        .and_then(Value::as_str);
        if !action.is_some_and(|a| rule.actions.iter().any(|x| x == a)) {
            return false;
        }
    }
    if !rule.labels.is_empty() {
        let labels = labels_of(scheme, p);
        if !rule.labels.iter().any(|l| labels.iter().any(|x| x == l)) {
            return false;
        }
    }
    if !rule.branches.is_empty() {
        let Some(branch) = branch_of(scheme, p) else {
            return false;
        };
        let default = match scheme {
            WebhookScheme::Github => lookup(p, "repository.default_branch"),
            WebhookScheme::Gitlab => lookup(p, "project.default_branch"),
            WebhookScheme::Standard => lookup(p, "data.default_branch"),
        }
        .and_then(Value::as_str);
        let hit = rule.branches.iter().any(|b| {
            if b == "$default" {
                default == Some(branch.as_str())
            } else {
                *b == branch
            }
        });
        if !hit {
            return false;
        }
    }
    true
}

fn labels_of(scheme: WebhookScheme, p: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut names = |v: Option<&Value>, field: &str| {
        for l in v.and_then(Value::as_array).into_iter().flatten() {
            match l {
                Value::String(s) => out.push(s.clone()),
                other => {
                    if let Some(s) = other.get(field).and_then(Value::as_str) {
                        out.push(s.to_owned());
                    }
                }
            }
        }
    };
    match scheme {
        WebhookScheme::Github => {
            names(lookup(p, "issue.labels"), "name");
            names(lookup(p, "pull_request.labels"), "name");
        }
        WebhookScheme::Gitlab => {
            names(lookup(p, "labels"), "title");
            names(lookup(p, "object_attributes.labels"), "title");
        }
        WebhookScheme::Standard => names(lookup(p, "data.labels"), "name"),
    }
    if scheme == WebhookScheme::Github {
        if let Some(s) = lookup(p, "label.name").and_then(Value::as_str) {
            out.push(s.to_owned());
        }
    }
    out
}

fn branch_of(scheme: WebhookScheme, p: &Value) -> Option<String> {
    let from_ref = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("refs/heads/"))
            .map(str::to_owned)
    };
    let plain = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    match scheme {
        WebhookScheme::Github => {
            from_ref(lookup(p, "ref")).or_else(|| plain(lookup(p, "pull_request.base.ref")))
        }
        WebhookScheme::Gitlab => from_ref(lookup(p, "ref"))
            .or_else(|| plain(lookup(p, "object_attributes.target_branch"))),
        WebhookScheme::Standard => plain(lookup(p, "data.branch")),
    }
}

/// The value at a dotted path (`issue.labels.0.name`); numeric segments index arrays.
pub fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |cur, seg| match cur {
        Value::Object(m) => m.get(seg),
        Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Field(&'a str),
}

/// Parses `text {a.b} text`, with `{{`/`}}` as literal braces.
fn parse(t: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{{") {
            out.push(Piece::Text("{"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix("}}") {
            out.push(Piece::Text("}"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| format!("unclosed {{ in template {t:?}"))?;
            let path = &r[..end];
            let valid = !path.is_empty()
                && path.split('.').all(|seg| {
                    !seg.is_empty()
                        && seg
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                });
            if !valid {
                return Err(format!(
                    "{{{path}}} in template {t:?} is not a dotted field path"
                ));
            }
            out.push(Piece::Field(path));
            rest = &r[end + 1..];
        } else if rest.starts_with('}') {
            return Err(format!("unmatched }} in template {t:?}"));
        } else {
            let end = rest.find(['{', '}']).unwrap_or(rest.len());
            out.push(Piece::Text(&rest[..end]));
            rest = &rest[end..];
        }
    }
    Ok(out)
}

/// Renders a template against a payload.
pub fn render(template: &str, payload: &Value) -> Result<String, String> {
    let mut s = String::new();
    for piece in parse(template)? {
        match piece {
            Piece::Text(t) => s.push_str(t),
            Piece::Field(path) => match lookup(payload, path) {
                Some(Value::String(v)) => s.push_str(v),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => s.push_str(&v.to_string()),
                Some(_) => return Err(format!("payload field {path} is not a string or number")),
                None => return Err(format!("payload has no field {path}")),
            },
        }
    }
    Ok(s)
}

fn render_task(t: &WebhookTaskTemplate, p: &Value) -> Result<TaskRequest, String> {
    Ok(TaskRequest {
        title: Some(render(&t.title, p)?),
        repository: Some(render(&t.repository, p)?),
        description: t.description.as_deref().map(|d| render(d, p)).transpose()?,
        priority: t.priority.clone(),
        tags: (!t.tags.is_empty()).then(|| t.tags.clone()),
        ..Default::default()
    })
}

/// Checks a rule at start-up: templates parse, the priority and action names are valid.
pub fn check_rule(r: &WebhookRule) -> Result<(), String> {
    if r.name.is_empty() || r.name.len() > 64 {
        return Err("the name must be 1-64 characters".into());
    }
    if r.event.is_empty() {
        return Err("event must not be empty".into());
    }
    parse(&r.task.title)?;
    parse(&r.task.repository)?;
    if let Some(d) = &r.task.description {
        parse(d)?;
    }
    if let Some(p) = &r.task.priority {
        if Priority::parse(p).is_none() {
            return Err(format!(
                "priority {p:?} must be low, medium, high or critical"
            ));
        }
    }
    if let Some(a) = &r.task.action {
        if !crate::task::validate::is_valid_repository(a, 64) {
            return Err(format!("action {a:?} must match ^[A-Za-z0-9_-]{{1,64}}$"));
        }
    }
    if r.task.tags.len() > 10 {
        return Err("at most 10 tags".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(event: &str) -> WebhookRule {
        WebhookRule {
            name: "r".into(),
            event: event.into(),
            actions: vec![],
            labels: vec![],
            branches: vec![],
            task: WebhookTaskTemplate {
                title: "Issue #{issue.number}: {issue.title}".into(),
                repository: "{repository.name}".into(),
                description: None,
                priority: Some("high".into()),
                action: Some("triage".into()),
                tags: vec!["github".into()],
            },
        }
    }

    fn issue(action: &str, labels: &[&str]) -> Value {
        json!({
            "action": action,
            "issue": {"number": 7, "title": "Crash on start", "labels": labels.iter().map(|l| json!({"name": l})).collect::<Vec<_>>()},
            "repository": {"name": "demo", "default_branch": "main"}
        })
    }

    #[test]
    fn templates_render_fields_numbers_and_literal_braces() {
        let p = issue("opened", &[]);
        assert_eq!(
            render("#{issue.number} {{x}} {issue.title}", &p).unwrap(),
            "#7 {x} Crash on start"
        );
        assert!(render("{issue.nope}", &p)
            .unwrap_err()
            .contains("issue.nope"));
        assert!(render("{issue}", &p).is_err(), "objects are refused");
        assert!(parse("{unclosed").is_err());
        assert!(parse("bad }").is_err());
        assert!(parse("{a b}").is_err());
    }

    #[test]
    fn actions_and_labels_filter() {
        let mut r = rule("issues");
        r.actions = vec!["opened".into(), "labeled".into()];
        r.labels = vec!["mhv".into()];
        let rules = [r];
        let hit = route(
            WebhookScheme::Github,
            "issues",
            &issue("opened", &["bug", "mhv"]),
            &rules,
        );
        let Verdict::Task { request, .. } = hit else {
            panic!("{hit:?}")
        };
        assert_eq!(request.title.as_deref(), Some("Issue #7: Crash on start"));
        assert_eq!(request.repository.as_deref(), Some("demo"));
        assert_eq!(request.metadata.unwrap()["action"], "triage");
        assert_eq!(
            route(
                WebhookScheme::Github,
                "issues",
                &issue("closed", &["mhv"]),
                &rules
            ),
            Verdict::NoMatch
        );
        assert_eq!(
            route(
                WebhookScheme::Github,
                "issues",
                &issue("opened", &["bug"]),
                &rules
            ),
            Verdict::NoMatch
        );
        assert_eq!(
            route(
                WebhookScheme::Github,
                "push",
                &issue("opened", &["mhv"]),
                &rules
            ),
            Verdict::NoMatch
        );
        // The label just added counts too.
        let mut p = issue("labeled", &[]);
        p["label"] = json!({"name": "mhv"});
        assert!(matches!(
            route(WebhookScheme::Github, "issues", &p, &rules),
            Verdict::Task { .. }
        ));
    }

    #[test]
    fn default_branch_filter_for_github_and_gitlab_pushes() {
        let mut r = rule("push");
        r.branches = vec!["$default".into()];
        r.task.title = "Push to {repository.name}".into();
        let rules = [r];
        let gh = |reference: &str| json!({"ref": reference, "repository": {"name": "demo", "default_branch": "main"}});
        assert!(matches!(
            route(
                WebhookScheme::Github,
                "push",
                &gh("refs/heads/main"),
                &rules
            ),
            Verdict::Task { .. }
        ));
        for other in ["refs/heads/feature", "refs/tags/main"] {
            assert_eq!(
                route(WebhookScheme::Github, "push", &gh(other), &rules),
                Verdict::NoMatch
            );
        }
        let mut r = rule("Push Hook");
        r.branches = vec!["$default".into()];
        r.task.title = "Push to {project.path}".into();
        r.task.repository = "{project.path}".into();
        let gl = json!({"ref": "refs/heads/main", "project": {"path": "demo", "default_branch": "main"}});
        assert!(matches!(
            route(WebhookScheme::Gitlab, "Push Hook", &gl, &[r]),
            Verdict::Task { .. }
        ));
    }

    #[test]
    fn a_missing_field_is_an_invalid_verdict_not_a_panic() {
        let rules = [rule("issues")];
        let v = route(
            WebhookScheme::Github,
            "issues",
            &json!({"action": "opened"}),
            &rules,
        );
        assert!(matches!(v, Verdict::Invalid { .. }), "{v:?}");
    }

    #[test]
    fn standard_event_comes_from_the_body_type() {
        assert_eq!(
            event_of(
                WebhookScheme::Standard,
                "",
                &json!({"type": "invoice.paid"})
            ),
            "invoice.paid"
        );
        assert_eq!(
            event_of(WebhookScheme::Github, "issues", &json!({"type": "x"})),
            "issues"
        );
    }

    proptest::proptest! {
        #[test]
        fn template_parsing_and_rendering_never_panic(t in ".{0,64}", v in proptest::arbitrary::any::<u32>()) {
            let p = json!({"a": {"b": v, "c": "x"}, "list": [1, "two"]});
            let _ = render(&t, &p);
        }
    }
}
