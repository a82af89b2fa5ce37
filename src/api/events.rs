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
    /// When it was created, started and ended (seconds since the epoch).
    times: [Option<u64>; 3],
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
                    times: [Some(c.config.created), st.started, st.finished],
                },
            ))
        })
        .collect()
}

fn event(action: &str, id: &str, seen: &Seen) -> Value {
    event_at(action, id, seen, None)
}

/// An event at `secs` (now if none).
fn event_at(action: &str, id: &str, seen: &Seen, secs: Option<u64>) -> Value {
    let now = secs.map_or_else(
        || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
        },
        std::time::Duration::from_secs,
    );
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

/// The events since `since` that the records still show (create, start,
/// die), oldest first: what a client asking for past events gets.
fn replay(now: &HashMap<String, Seen>, since: u64) -> Vec<Value> {
    let mut past: Vec<(u64, usize, &String, &Seen)> = Vec::new();
    for (id, seen) in now {
        for (i, t) in seen.times.iter().enumerate() {
            if let Some(t) = t.filter(|&t| t >= since) {
                past.push((t, i, id, seen));
            }
        }
    }
    past.sort_by_key(|&(t, i, id, _)| (t, i, id.clone()));
    past.into_iter()
        .map(|(t, i, id, seen)| event_at(["create", "start", "die"][i], id, seen, Some(t)))
        .collect()
}

/// Streams events until the client goes (or `until` passes); with `since`,
/// the past ones the container records show first.
pub fn events(api: &Arc<Api>, query: &Query) -> ApiResult {
    let until: Option<u64> = query.number::<f64>("until")?.map(|u| {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let u = u.max(0.0) as u64;
        u
    });
    let since: Option<u64> = query.number::<f64>("since")?.map(|u| {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let u = u.max(0.0) as u64;
        u
    });
    let filters = super::parse_filters(query.get("filters"))?;
    let (response, tx) = streaming("application/json");
    let api = api.clone();
    // An async task: a stream holds no thread while it waits (on the poll or
    // on a slow client); only each snapshot of the records is a short
    // blocking job.
    tokio::spawn(async move {
        let take = |api: &Arc<Api>| {
            let api = api.clone();
            tokio::task::spawn_blocking(move || snapshot(&api))
        };
        let Ok(mut before) = take(&api).await else {
            return;
        };
        let mut pending = since.map(|s| replay(&before, s)).unwrap_or_default();
        loop {
            if tx.is_closed() || until.is_some_and(|u| crate::container::now() > u) {
                return;
            }
            if pending.is_empty() {
                tokio::time::sleep(POLL).await;
            }
            let Ok(after) = take(&api).await else {
                return;
            };
            pending.extend(diff(&before, &after));
            for e in std::mem::take(&mut pending) {
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
                if keep && tx.send(json_line(&e)).await.is_err() {
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
            times: [Some(10), Some(20), None],
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

    #[test]
    fn past_events_are_replayed_from_the_records() {
        let now = HashMap::from([("a".to_string(), seen(Status::Running))]);
        assert_eq!(actions(&replay(&now, 0)), ["create", "start"]);
        assert_eq!(actions(&replay(&now, 15)), ["start"]);
        assert_eq!(replay(&now, 15)[0]["time"], 20);
        assert!(replay(&now, 30).is_empty());
    }
}
