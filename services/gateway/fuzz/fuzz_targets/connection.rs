//! Client-frame parsing and the `Connection` state machine under arbitrary input: any bytes as a
//! client frame, interleaved with live deliveries, inbox pages, gaps and ticks. Nothing panics,
//! and no event id is ever written twice.
#![no_main]

use std::collections::HashSet;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;

use colloquy_core::UserId;
use colloquy_core::records::{Delivery, ResponseBody};
use colloquy_core::wire::{ClientFrame, EventId};
use colloquy_gateway::connection::{Action, Connection, InboxPage, Limits, Published};

fn answer(ms: u64) -> Arc<Delivery> {
    Arc::new(Delivery {
        event_id: Some(EventId { ms, seq: 0 }.to_string()),
        msg_id: format!("m{ms}"),
        userid: UserId::parse("fuzzer").expect("valid userid"),
        received_at_ms: 0,
        timestamp: String::new(),
        relayed_at_ms: 0,
        traceparent: None,
        body: ResponseBody::Final {
            content: String::new(),
            prompt_tokens: 0,
            completion_tokens: 0,
            whole: false,
        },
    })
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        replay_page: 3,
        max_pending: 4,
        ..Limits::default()
    };
    let (mut conn, first) =
        Connection::open(limits, "fuzzer", EventId::default(), None, Some(u64::MAX), 0);
    let mut written = HashSet::new();
    let mut check = |actions: Vec<Action>| {
        for a in actions {
            if let Action::Deliver(d) = a {
                let id = d.event_id.clone().expect("answers carry ids");
                assert!(written.insert(id), "an event id written twice");
            }
        }
    };
    check(first);
    let mut now = 0u64;
    let mut chunks = data.split(|b| *b == 0xff);
    while let Some(chunk) = chunks.next() {
        let Some((&op, rest)) = chunk.split_first() else { continue };
        now += u64::from(op);
        let arg = rest.first().copied().map_or(0, u64::from);
        let actions = match op % 7 {
            0 => {
                let text = String::from_utf8_lossy(rest);
                let _ = ClientFrame::parse(&text, 64);
                conn.on_text(&text, now)
            }
            1 => conn.on_live(answer(arg)),
            2 => conn.on_gap(),
            3 => conn.on_inbox(Some(InboxPage {
                entries: rest.iter().map(|&b| answer(u64::from(b))).collect(),
                more: arg % 2 == 0,
                trimmed: Some(arg % 3 == 0),
            })),
            4 => conn.on_inbox(None),
            5 => conn.on_tick(now),
            _ => conn.on_published(format!("m{arg}"), Published::Unavailable),
        };
        check(actions);
    }
});
