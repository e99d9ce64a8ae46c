//! `cargo fuzz` target: the control API's request handling as a client controls it: the
//! method and URL of every endpoint (`api::handle`, with a context whose counters and
//! devices are real objects), and the body of every control endpoint
//! (`api::parse_command`), which must answer a command or one sentence of error, never
//! panic, and take only what the body holds.
//!
//! Input: `[selector, method, ...url bytes..., 0, ...body]`: `selector` picks the control
//! endpoint the body goes to (or none), `method` one of GET/PUT/POST/DELETE/other; the URL
//! runs to the first zero byte (prefixed with `/api/v1/` when `selector >> 7` is set).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use vmm::api::{handle, parse_command, ApiContext, Command, CONTROL_ENDPOINTS, MAX_BODY, PREFIX};
use vmm::exit::ExitHandle;
use vmm::plug::{ConfigList, Registry};
use vmm::stats::ExitStats;

fn context() -> (ApiContext, std::sync::mpsc::Receiver<vmm::exit::Control>) {
    let (exit, rx) = ExitHandle::new();
    let devices = Registry::default();
    devices.lock().unwrap().record(
        "disk0",
        "virtio-blk",
        1,
        (ConfigList::Disks, json!({ "id": "disk0", "path": "/img" })),
    );
    (
        ApiContext {
            config: json!({ "cpus": { "boot_vcpus": 1 } }),
            devices,
            memory: 64 << 20,
            pause: Arc::default(),
            vcpu_threads: Arc::default(),
            exit,
            counters: Box::new(ExitStats::default),
            devices_pause: Box::new(|_| Ok(())),
            clock: Box::new(|_| Ok(())),
        },
        rx,
    )
}

fuzz_target!(|data: &[u8]| {
    let [selector, method, rest @ ..] = data else {
        return;
    };
    let method = match method % 5 {
        0 => "GET",
        1 => "PUT",
        2 => "POST",
        3 => "DELETE",
        _ => "PATCH",
    };
    let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let url = String::from_utf8_lossy(&rest[..split]);
    let body = rest.get(split + 1..).unwrap_or_default();
    let url = if selector >> 7 == 1 {
        format!("{PREFIX}{url}")
    } else {
        url.into_owned()
    };
    let (ctx, _rx) = context();
    let (status, reply) = handle(&ctx, method, &url);
    assert!((200..600).contains(&status), "{status}");
    if status >= 400 {
        let msg = reply.as_ref().and_then(|r| r["error"].as_str()).unwrap_or("");
        assert!(!msg.is_empty(), "an error without a reason: {reply:?}");
    }
    if let Some(endpoint) = CONTROL_ENDPOINTS.get(usize::from(selector & 0x7f) % (CONTROL_ENDPOINTS.len() + 1)) {
        if body.len() > MAX_BODY {
            return;
        }
        match parse_command(endpoint, body) {
            Ok(Command::Add(rq)) => {
                // What reaches the command line's parser is key=value pairs without a
                // separator smuggled in from a field.
                for part in rq.options.split(',') {
                    assert_eq!(part.matches('=').count(), 1, "{:?}", rq.options);
                }
                assert!(rq.id.as_deref().is_none_or(|id| !id.contains(',') && !id.contains('=')));
            }
            Ok(Command::Remove(id)) => assert!(!id.is_empty()),
            Ok(_) => {}
            Err(e) => {
                assert!(!e.is_empty());
                assert!(!e.contains('\n'), "one line: {e}");
            }
        }
    }
});
