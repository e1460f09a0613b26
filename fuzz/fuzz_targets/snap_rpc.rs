//! The SNAP emulator's JSON-RPC reader and its method decoders: any bytes on the socket, read as
//! the emulator reads them (back-to-back values, SPDK's value and nesting limits), each request
//! that validates run against an emulated BlueField-3. Errors are answers, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snap_emulator::server::{next_value, validate, Next, MAX_NESTING, MAX_VALUES};
use snap_emulator::state::State;

fuzz_target!(|data: &[u8]| {
    let table = snap_emulator::functions::bluefield3(1, 4, "MT0000FUZZ").unwrap();
    let mut state = State::new(table, true, 1);
    let mut buf = data;
    // At most as many requests as a connection could send in this many bytes.
    for _ in 0..256 {
        match next_value(buf) {
            Next::Value(p, used) => {
                buf = &buf[used..];
                if p.values > MAX_VALUES || p.nesting > MAX_NESTING {
                    return;
                }
                if let Ok(req) = validate(p) {
                    let _ = state.call(&req.method, &req.params);
                }
            }
            Next::Incomplete | Next::Empty | Next::ParseError => return,
        }
    }
});
