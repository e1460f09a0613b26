//! The dpu-agent's reading of SNAP's replies: any JSON as the answers to the four list calls an
//! inventory is made of. A reply of the wrong shape is a protocol error, never a panic.
#![no_main]

use dpu_agent::snap::{inventory_from_replies, SnapReplies};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // One JSON array of up to four replies; missing ones are empty lists.
    let Ok(Value::Array(mut replies)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    replies.resize(4, Value::Array(vec![]));
    let clusters = replies.pop().filter(|v| !v.is_null());
    let bdevs = replies.pop().unwrap();
    let subsystems = replies.pop().unwrap();
    let functions = replies.pop().unwrap();
    let r = SnapReplies {
        functions,
        subsystems,
        bdevs,
        clusters,
    };
    if let Ok(inv) = inventory_from_replies(r, |b| (b.len() % 2 == 0).then(|| "ceph".to_string())) {
        // Every controller and namespace listed comes from the replies, nothing invented.
        let _ = serde_json::to_string(&inv).unwrap();
    }
});
