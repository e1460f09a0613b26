//! `dpu-agent`: the agent on a BlueField-3 DPU. Its SNAP client, deployment, status and commands
//! are the subject of the next piece of work (see ARCHITECTURE.md); until then the binary refuses
//! to start rather than pretend to manage anything.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("dpu-agent: not built yet; this release ships the protocol and the ceph-agent only");
    ExitCode::from(2)
}
