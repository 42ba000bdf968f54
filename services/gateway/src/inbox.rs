//! Reading a user's durable inbox (`inbox:{U}`, a Redis stream): the current position, the
//! entries after a cursor, and whether entries after a cursor were trimmed.

use std::collections::HashMap;
use std::sync::Arc;

use fred::prelude::*;
use fred::types::Value;

use colloquy_core::UserId;
use colloquy_core::names::Names;
use colloquy_core::records::{Delivery, INBOX_FIELD};
use colloquy_core::wire::EventId;

use crate::connection::InboxPage;

/// The last event id in the user's inbox (`XREVRANGE + - COUNT 1`), `0-0` when it is empty.
///
/// # Errors
/// When Redis fails.
pub async fn position(redis: &Pool, names: &Names, user: &UserId) -> Result<EventId, Error> {
    let last: Vec<(String, HashMap<String, String>)> = redis
        .xrevrange(names.inbox_key(user), "+", "-", Some(1))
        .await?;
    Ok(last
        .first()
        .and_then(|(id, _)| EventId::parse(id))
        .unwrap_or_default())
}

/// Reads up to `limit` deliveries after `after` (exclusive); with `check_trim`, also whether
/// the inbox lost entries after `after` (trimmed by `MAXLEN`, or expired).
///
/// # Errors
/// When Redis fails.
pub async fn read(
    redis: &Pool,
    names: &Names,
    user: &UserId,
    after: EventId,
    limit: u64,
    check_trim: bool,
) -> Result<InboxPage, Error> {
    let key = names.inbox_key(user);
    let entries: Vec<(String, HashMap<String, String>)> = redis
        .xrange(&key, format!("({after}"), "+", Some(limit))
        .await?;
    let more = entries.len() as u64 >= limit;
    let mut out = Vec::with_capacity(entries.len());
    for (id, fields) in entries {
        let Some(body) = fields.get(INBOX_FIELD) else {
            continue;
        };
        match serde_json::from_str::<Delivery>(body) {
            Ok(mut d) => {
                d.event_id = Some(id);
                out.push(Arc::new(d));
            }
            Err(e) => {
                tracing::warn!(userid = %user, event_id = %id, error = %e, "unreadable inbox entry skipped");
            }
        }
    }
    // Asked after the read: a trim racing it can only make the answer more cautious.
    let trimmed = if check_trim {
        Some(trimmed_after(redis, &key, after).await?)
    } else {
        None
    };
    Ok(InboxPage {
        entries: out,
        more,
        trimmed,
    })
}

/// Whether the stream at `key` may have lost entries after `after`: it no longer exists while
/// the cursor is not `0-0` (expired), or it was trimmed (`entries-added` above `length`) and its
/// first entry kept is above the cursor, or an entry above the cursor was deleted
/// (`max-deleted-entry-id`, which Redis updates on `XDEL`, not on trimming). Cautious: a cursor
/// just below the first entry kept counts as incomplete even when nothing between was ever there.
async fn trimmed_after(redis: &Pool, key: &str, after: EventId) -> Result<bool, Error> {
    let exists: i64 = redis.exists(key).await?;
    if exists == 0 {
        return Ok(after != EventId::default());
    }
    let info: HashMap<String, Value> = redis.xinfo_stream(key, false, None).await?;
    let number = |k: &str| info.get(k).and_then(Value::as_u64).unwrap_or(0);
    let id = |k: &str| {
        info.get(k)
            .and_then(Value::as_string)
            .and_then(|s| EventId::parse(&s))
            .unwrap_or_default()
    };
    let trimmed = number("entries-added") > number("length");
    let first_kept = if number("length") == 0 {
        // Everything was removed: the next entry would come after the last id generated.
        EventId {
            ms: id("last-generated-id").ms,
            seq: id("last-generated-id").seq.saturating_add(1),
        }
    } else {
        id("recorded-first-entry-id")
    };
    Ok((trimmed && first_kept > after) || id("max-deleted-entry-id") > after)
}
