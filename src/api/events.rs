//! `GET /events`: container events (create, start, die, destroy), found by
//! watching the container records: the same for containers of the API and
//! of the CLI, and nothing for the server to remember.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::{json_line, streaming, Api, ApiResult, Query};
use crate::container::Status;

/// How often the records are looked at.
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    status: Status,
    name: String,
    image: String,
    exit_code: Option<i32>,
}

fn snapshot(api: &Api) -> HashMap<String, Seen> {
    api.containers()
        .list()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| {
            let st = c.state().ok()?;
            Some((
                c.config.id.clone(),
                Seen {
                    status: st.status,
                    name: c.config.name.clone(),
                    image: c.config.image.clone(),
                    exit_code: st.exit_code,
                },
            ))
        })
        .collect()
}

fn event(action: &str, id: &str, seen: &Seen) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut attributes = json!({ "name": seen.name, "image": seen.image });
    if action == "die" {
        attributes["exitCode"] = json!(seen.exit_code.unwrap_or(0).to_string());
    }
    json!({
        "status": action,
        "id": id,
        "from": seen.image,
        "Type": "container",
        "Action": action,
        "Actor": { "ID": id, "Attributes": attributes },
        "scope": "local",
        "time": now.as_secs(),
        "timeNano": now.as_nanos(),
    })
}

/// The events between two snapshots, in the order they happened.
fn diff(before: &HashMap<String, Seen>, after: &HashMap<String, Seen>) -> Vec<Value> {
    let mut out = Vec::new();
    for (id, now) in after {
        let was = before.get(id).map(|s| s.status);
        if was.is_none() {
            out.push(event("create", id, now));
        }
        let started = matches!(was, None | Some(Status::Created)) && now.status != Status::Created;
        if started {
            out.push(event("start", id, now));
        }
        if now.status == Status::Exited && was != Some(Status::Exited) {
            out.push(event("die", id, now));
        }
    }
    for (id, gone) in before {
        if !after.contains_key(id) {
            if gone.status != Status::Exited {
                out.push(event("die", id, gone));
            }
            out.push(event("destroy", id, gone));
        }
    }
    out
}

/// Streams events until the client goes (or `until` passes).
pub fn events(api: &Arc<Api>, query: &Query) -> ApiResult {
    let until: Option<u64> = query.number::<f64>("until")?.map(|u| {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let u = u.max(0.0) as u64;
        u
    });
    let filters = super::parse_filters(query.get("filters"))?;
    let (response, tx) = streaming("application/json");
    let api = api.clone();
    tokio::task::spawn_blocking(move || {
        let mut before = snapshot(&api);
        loop {
            if tx.is_closed() || until.is_some_and(|u| crate::container::now() > u) {
                return;
            }
            std::thread::sleep(POLL);
            let after = snapshot(&api);
            for e in diff(&before, &after) {
                let keep = filters.iter().all(|(k, v)| match k.as_str() {
                    "type" => v == "container",
                    "event" | "status" => e["Action"] == v.as_str(),
                    "container" => {
                        e["id"]
                            .as_str()
                            .is_some_and(|id| id.starts_with(v.as_str()))
                            || e["Actor"]["Attributes"]["name"] == v.as_str()
                    }
                    _ => true,
                });
                if keep && tx.blocking_send(json_line(&e)).is_err() {
                    return;
                }
            }
            before = after;
        }
    });
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(status: Status) -> Seen {
        Seen {
            status,
            name: "n".into(),
            image: "i".into(),
            exit_code: Some(3),
        }
    }

    fn actions(events: &[Value]) -> Vec<String> {
        events
            .iter()
            .map(|e| e["Action"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_containers_life_reads_as_dockers_events() {
        let empty = HashMap::new();
        let created = HashMap::from([("a".to_string(), seen(Status::Created))]);
        let running = HashMap::from([("a".to_string(), seen(Status::Running))]);
        let exited = HashMap::from([("a".to_string(), seen(Status::Exited))]);
        assert_eq!(actions(&diff(&empty, &created)), ["create"]);
        assert_eq!(actions(&diff(&created, &running)), ["start"]);
        let die = diff(&running, &exited);
        assert_eq!(actions(&die), ["die"]);
        assert_eq!(die[0]["Actor"]["Attributes"]["exitCode"], "3");
        assert_eq!(actions(&diff(&exited, &empty)), ["destroy"]);
        // A whole --rm life between two looks.
        assert_eq!(actions(&diff(&running, &empty)), ["die", "destroy"]);
        assert_eq!(actions(&diff(&empty, &exited)), ["create", "start", "die"]);
        assert!(diff(&running, &running).is_empty());
    }
}
