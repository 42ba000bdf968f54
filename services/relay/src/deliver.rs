//! Turning `responses` records into Redis writes: decoding, the delivery script, and one
//! pipelined round trip per batch with a result per record.

use fred::prelude::*;
use fred::types::CustomCommand;
use fred::types::scripts::Script;

use colloquy_core::names::Names;
use colloquy_core::records::{Delivery, ResponseRecord, SCHEMA_VERSION};
use colloquy_core::semconv::{self, Consumed};
use colloquy_core::trace_context::{continue_from, traceparent_of};

/// Appends to the inbox and publishes, once per send of a message, and clears the message
/// from the unanswered-message audit.
/// KEYS: inbox, channel, delivered marker, audit set.
/// ARGV: maxlen, payload, inbox TTL ms, marker TTL ms, audit member.
/// The marker holds the entry id (a resend of the message id reads the stored answer back
/// through it). The payload is a JSON object without `event_id`; the published copy gets it
/// spliced in front.
pub const DELIVER_LUA: &str = r#"
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('ZREM', KEYS[4], ARGV[5])
  return 0
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'd', ARGV[2])
redis.call('SET', KEYS[3], id, 'PX', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZREM', KEYS[4], ARGV[5])
redis.call('PUBLISH', KEYS[2], '{"event_id":"' .. id .. '",' .. string.sub(ARGV[2], 2))
return 1
"#;

/// The script, with its SHA loaded lazily.
#[must_use]
pub fn script() -> Script {
    Script::from_lua(DELIVER_LUA)
}

/// One record of a batch, decoded.
#[derive(Debug)]
pub enum Item {
    /// A final answer or failure: stored once, then published.
    Durable {
        inbox: String,
        channel: String,
        marker: String,
        audit_member: String,
        payload: String,
    },
    /// Streamed tokens: only published.
    Delta { channel: String, payload: String },
}

impl Item {
    #[must_use]
    pub fn is_durable(&self) -> bool {
        matches!(self, Self::Durable { .. })
    }
}

/// A decoded record with the span of its delivery (durable ones only).
#[derive(Debug)]
pub struct Decoded {
    pub item: Item,
    pub span: Option<tracing::Span>,
}

/// Decodes one record's payload, consumed `from` a partition; `Err` carries the reason it must
/// be dead-lettered.
///
/// # Errors
/// When the payload is missing, not JSON of a response record, or of another schema version.
pub fn decode(
    names: &Names,
    payload: Option<&[u8]>,
    traceparent: Option<&str>,
    from: &Consumed<'_>,
    now_ms: i64,
    timestamp: &str,
) -> Result<Decoded, String> {
    let payload = payload.ok_or("empty payload")?;
    let record: ResponseRecord =
        serde_json::from_slice(payload).map_err(|e| format!("unreadable record: {e}"))?;
    if record.v != SCHEMA_VERSION {
        return Err(format!("unsupported schema version {}", record.v));
    }
    let durable = record.body.is_durable();
    let (span, traceparent) = if durable {
        let span = semconv::process_span(from, &record.userid, &record.msg_id);
        continue_from(&span, traceparent);
        let tp = traceparent_of(&span);
        (Some(span), tp)
    } else {
        (None, None)
    };
    let channel = names.user_channel(&record.userid);
    let nonce = record.received_at_ms;
    let delivery = Delivery {
        event_id: None,
        msg_id: record.msg_id,
        userid: record.userid,
        received_at_ms: record.received_at_ms,
        timestamp: timestamp.to_owned(),
        relayed_at_ms: now_ms,
        traceparent,
        body: record.body,
    };
    let payload = serde_json::to_string(&delivery).map_err(|e| e.to_string())?;
    let item = if durable {
        Item::Durable {
            inbox: names.inbox_key(&delivery.userid),
            channel,
            marker: names.delivered_key(&delivery.userid, &delivery.msg_id, nonce),
            audit_member: Names::audit_member(&delivery.userid, &delivery.msg_id),
            payload,
        }
    } else {
        Item::Delta { channel, payload }
    };
    Ok(Decoded { item, span })
}

/// What Redis said about each item of a batch.
#[derive(Debug)]
pub enum Written {
    /// Stored (durable, `true` when new rather than a redelivered duplicate) or published.
    Ok { new: bool },
    /// Refused for this item only (a permanent error, e.g. a key of the wrong type).
    Refused(Error),
}

/// Limits applied to every inbox.
#[derive(Clone, Debug)]
pub struct InboxLimits {
    pub maxlen: u64,
    pub ttl_ms: u64,
    pub marker_ttl_ms: u64,
}

/// Writes `items` in one pipelined round trip.
///
/// # Errors
/// When the round trip itself fails (connection, timeout, `NOSCRIPT`): nothing is known to be
/// written and the whole batch is retried (the script makes that safe).
pub async fn write(
    redis: &Pool,
    script: &Script,
    audit_key: &str,
    limits: &InboxLimits,
    items: &[&Item],
) -> Result<Vec<Written>, Error> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let client = redis.next();
    let pipe = client.pipeline();
    let maxlen = limits.maxlen.to_string();
    let inbox_ttl = limits.ttl_ms.to_string();
    let marker_ttl = limits.marker_ttl_ms.to_string();
    for item in items {
        match item {
            Item::Durable {
                inbox,
                channel,
                marker,
                audit_member,
                payload,
            } => {
                // Pipelines have no script interface in fred; EVALSHA goes as a plain command.
                let args: Vec<&str> = vec![
                    script.sha1(),
                    "4",
                    inbox,
                    channel,
                    marker,
                    audit_key,
                    &maxlen,
                    payload,
                    &inbox_ttl,
                    &marker_ttl,
                    audit_member,
                ];
                let _: () = pipe
                    .custom(CustomCommand::new_static("EVALSHA", None, false), args)
                    .await?;
            }
            Item::Delta { channel, payload } => {
                let _: () = pipe.publish(channel.as_str(), payload.as_str()).await?;
            }
        }
    }
    let results: Vec<Result<Value, Error>> = pipe.try_all().await;
    let mut out = Vec::with_capacity(items.len());
    for (item, result) in items.iter().zip(results) {
        match result {
            Ok(v) => out.push(Written::Ok {
                new: !item.is_durable() || v.as_i64() == Some(1),
            }),
            Err(e)
                if colloquy_core::retry::redis_class(&e)
                    == colloquy_core::retry::Class::Permanent =>
            {
                out.push(Written::Refused(e));
            }
            // A transient error on any item (connection, NOSCRIPT): retry the batch.
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use colloquy_core::UserId;
    use colloquy_core::records::ResponseBody;

    const FROM: Consumed<'static> = Consumed {
        topic: "responses",
        partition: 0,
        offset: 7,
        group: "relay",
    };

    #[test]
    fn the_script_writes_the_field_the_gateway_reads() {
        let field = colloquy_core::records::INBOX_FIELD;
        assert!(DELIVER_LUA.contains(&format!("'*', '{field}', ARGV[2]")));
    }

    fn record(body: ResponseBody) -> Vec<u8> {
        serde_json::to_vec(&ResponseRecord {
            v: SCHEMA_VERSION,
            msg_id: "m1".into(),
            userid: UserId::parse("alice").unwrap(),
            received_at_ms: 42,
            body,
        })
        .unwrap()
    }

    #[test]
    fn a_final_is_durable_and_keyed_by_its_send() {
        let names = Names::with_prefixes("", "t:");
        let payload = record(ResponseBody::Final {
            content: "hi".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            whole: true,
        });
        let d = decode(&names, Some(&payload), None, &FROM, 7, "now").unwrap();
        let Item::Durable {
            inbox,
            marker,
            audit_member,
            payload,
            ..
        } = d.item
        else {
            panic!("a final must be durable");
        };
        assert_eq!(inbox, "t:inbox:alice");
        assert_eq!(marker, "t:delivered:alice:m1:42");
        assert_eq!(audit_member, "alice m1");
        assert!(payload.starts_with('{') && !payload.contains("event_id"));
        // The gateway's time to first text reads it from the delivery.
        assert!(payload.contains(r#""whole":true"#), "{payload}");
    }

    #[test]
    fn deltas_are_only_published_and_junk_is_refused() {
        let names = Names::default();
        let payload = record(ResponseBody::Delta {
            seq: 0,
            content: "h".into(),
        });
        assert!(
            !decode(&names, Some(&payload), None, &FROM, 7, "now")
                .unwrap()
                .item
                .is_durable()
        );
        for junk in [&b"not json"[..], b"{}", br#"{"v":99,"msg_id":"m","userid":"alice","received_at_ms":1,"body":{"kind":"failed","reason":"x"}}"#] {
            assert!(decode(&names, Some(junk), None, &FROM, 7, "now").is_err());
        }
        assert!(decode(&names, None, None, &FROM, 7, "now").is_err());
    }
}
