//! Hostile input to the watch daemon, as an attacker on the same host or with a commit to the
//! manifest repository would send it: files that never end or never open, cross-site and
//! rebound requests, clients that never finish their headers. Each is refused and the daemon
//! keeps answering.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{fleet_yaml, issue_pki, unique, volume_yaml, wait_until, Daemon};

/// A daemon over manifests whose agents are not there (nothing to reach: only its HTTP side
/// and its manifest loader are exercised).
fn daemon(dir: &Path, extra: &[&str]) -> Daemon {
    let pki = dir.join("pki");
    issue_pki(&pki, &[]);
    let m = dir.join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    let mut text = fleet_yaml(
        "ceph-x",
        "127.0.0.1:1",
        "rbd",
        "snap-x",
        &[("dpu-x", "127.0.0.1:1")],
    );
    text.push_str(&volume_yaml(&unique("v"), 0, "64Mi", "rbd", "Retain"));
    std::fs::write(m.join("fleet.yaml"), text).unwrap();
    let state = dir.join("state");
    let args = [
        m.to_str().unwrap(),
        "--pki-dir",
        pki.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    Daemon::start(&[&args[..], extra].concat(), &dir.join("watch.log"))
}

/// `host:port` of the daemon.
fn addr(d: &Daemon) -> String {
    d.url.trim_start_matches("http://").to_string()
}

/// Sends `request` as it is and returns the whole answer (the request asks to close).
fn raw(d: &Daemon, request: &str) -> String {
    let mut s = TcpStream::connect(addr(d)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("")
}

#[test]
fn cross_site_and_rebound_requests_are_refused_and_slow_clients_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), &["--http-header-timeout", "1s"]);
    let host = addr(&d);
    // A page of evil.example POSTing a simple (no preflight) request: refused, nothing done.
    let evil = raw(
        &d,
        &format!("POST /api/v1/suspend/dpu/dpu-0 HTTP/1.1\r\nHost: {host}\r\nOrigin: http://evil.example\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"),
    );
    assert!(status_line(&evil).contains(" 403 "), "{evil}");
    // Same origin, but not JSON (a form): refused too.
    let form = raw(
        &d,
        &format!("POST /api/v1/suspend/dpu/dpu-0 HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\nConnection: close\r\n\r\na=b"),
    );
    assert!(status_line(&form).contains(" 415 "), "{form}");
    // DNS rebinding: evil.example resolved to 127.0.0.1, the browser says so in Host.
    let rebound = raw(
        &d,
        "GET /api/v1/status HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    );
    assert!(status_line(&rebound).contains(" 421 "), "{rebound}");
    assert!(
        !rebound.contains("\"fleet\""),
        "no status leaked: {rebound}"
    );
    // A liveness probe naming the address it dialled is answered (it learns only "ok").
    let probe = raw(
        &d,
        "GET /healthz HTTP/1.1\r\nHost: 10.0.0.7:7480\r\nConnection: close\r\n\r\n",
    );
    assert!(status_line(&probe).contains(" 200 "), "{probe}");
    // The daemon's own clients: JSON, its own Host and Origin. The suspension is new, so the
    // refused requests did not make it.
    let own = raw(
        &d,
        &format!("POST /api/v1/suspend/dpu/dpu-0 HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"),
    );
    assert!(status_line(&own).contains(" 200 "), "{own}");
    assert!(own.contains("\"changed\":true"), "{own}");
    let ok = raw(
        &d,
        "GET /healthz HTTP/1.1\r\nHost: localhost:PORT\r\nConnection: close\r\n\r\n"
            .replace("PORT", host.rsplit(':').next().unwrap())
            .as_str(),
    );
    assert!(status_line(&ok).contains(" 200 "), "{ok}");

    // Slow clients: headers never finished. They are dropped after the header deadline, and
    // the API answers all along.
    let slow: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut s = TcpStream::connect(&host).unwrap();
            s.write_all(b"GET /api/v1/status HTTP/1.1\r\nHost: ")
                .unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            s
        })
        .collect();
    assert!(d.get("/healthz").contains("ok"));
    let started = Instant::now();
    let mut slow = slow;
    wait_until(Duration::from_secs(30), "every slow client dropped", || {
        slow.retain_mut(|s| {
            let mut b = [0u8; 64];
            match s.read(&mut b) {
                Ok(0) => false,
                Ok(_) => false,
                Err(e) => matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            }
        });
        slow.is_empty()
    });
    eprintln!("100 slow clients dropped within {:?}", started.elapsed());
    assert!(d.get("/healthz").contains("ok"));
}

#[test]
fn a_fifo_and_an_endless_file_among_the_manifests_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), &[]);
    d.wait_for(Duration::from_secs(30), "the manifests loaded", |s| {
        s["manifests"]["valid"] == true
    });
    let m = dir.path().join("manifests");
    let made = Instant::now();
    assert!(std::process::Command::new("mkfifo")
        .arg(m.join("zz.yaml"))
        .status()
        .unwrap()
        .success());
    std::os::unix::fs::symlink("/dev/zero", m.join("zero.yaml")).unwrap();
    let s = d.wait_for(Duration::from_secs(30), "both refused", |s| {
        let e = s["manifests"]["error"].as_str().unwrap_or("");
        e.contains("zz.yaml") && e.contains("zero.yaml")
    });
    eprintln!("refused {:?} after the files appeared", made.elapsed());
    let e = s["manifests"]["error"].as_str().unwrap();
    assert!(e.contains("a FIFO, not a regular file"), "{e}");
    assert!(e.contains("outside the manifest directory"), "{e}");
    // The daemon answers, its memory did not balloon, and the good set stays in force.
    assert!(d.get("/healthz").contains("ok"));
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", d.child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(rss_kib < 256 * 1024, "peak RSS {rss_kib} KiB");
    assert_eq!(
        d.status()["fleet"]["volumes"].as_array().map(Vec::len),
        Some(1)
    );
    // `unistor validate` refuses them too, and ends.
    let o = e2e::unistor(&["validate", m.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", e2e::show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("zz.yaml") && err.contains("zero.yaml"),
        "{err}"
    );
}
