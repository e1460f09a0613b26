//! The programs' command lines, as a user or a pipeline meets them: a usage error exits 1 (never
//! 2, which `unistor plan` means as "changes pending"), `--help` exits 0 and needs nothing (no
//! cluster, no agents).

use std::process::{Command, Output};

use e2e::{bin, show};

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(bin(program))
        .args(args)
        // Nothing of a cluster: `--help` must not need one.
        .env_remove("UNISTOR_CEPH_CONF")
        .output()
        .expect("runs")
}

#[test]
fn a_mistyped_flag_is_a_usage_error_not_drift() {
    let o = run(
        "unistor",
        &["plan", "examples/lab", "--pki-dirr", "lab/pki"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--pki-dirr"),
        "the error names the flag: {}",
        show(&o)
    );
    for program in ["dpu-agent", "ceph-agent", "snap-emulator", "converge-bench"] {
        let o = run(program, &["--no-such-flag"]);
        assert_eq!(o.status.code(), Some(1), "{program}: {}", show(&o));
    }
}

#[test]
fn help_exits_zero_and_needs_nothing() {
    for program in [
        "unistor",
        "dpu-agent",
        "ceph-agent",
        "snap-emulator",
        "converge-bench",
    ] {
        let o = run(program, &["--help"]);
        assert_eq!(o.status.code(), Some(0), "{program}: {}", show(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Usage:"),
            "{program}: {}",
            show(&o)
        );
    }
    let o = run("converge-bench", &["--help"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("--dpus"),
        "{}",
        show(&o)
    );
}
