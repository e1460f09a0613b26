//! `unistor watch` end to end: real agents on the real cluster, emulated SNAP, the daemon as a
//! process. It converges from empty, follows manifest edits without being asked, removes
//! volumes by their policy, keeps the last good manifests when they break, restores what SNAP
//! lost with the same NSID and UUID, finishes an apply interrupted by a dead agent, honours
//! suspensions, and its dashboard renders in a real headless browser.

use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::lab::{namespaces, volume, Lab};
use e2e::{
    browser_dom, emulator_pids, reconciled, show, snap_call, unique, unistor, volume_yaml, Cluster,
};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(120);

fn in_trash(c: &Cluster, image: &str) -> bool {
    c.cli_ok("rbd", &["trash", "ls", "--format", "json", &c.pool])
        .contains(image)
}

#[test]
fn the_daemon_converges_follows_edits_and_removes_by_policy() {
    let c = Cluster::from_env();
    let lab = Lab::start(&c, 2, &[]);
    let [keep, grow, ret, trash, del] = ["keep", "grow", "ret", "trash", "del"].map(unique);
    lab.write(
        &c,
        &[
            (&keep, 0, "128Mi", "Retain"),
            (&grow, 0, "64Mi", "Retain"),
            (&ret, 1, "64Mi", "Retain"),
            (&trash, 1, "64Mi", "Trash"),
            (&del, 1, "64Mi", "Delete"),
        ],
    );
    let started = Instant::now();
    let d = lab.daemon(&["--allow-delete"]);
    d.wait_converged(CONVERGE, 5);
    println!(
        "from empty: 5 volumes on 2 DPUs converged {} ms after the daemon started",
        started.elapsed().as_millis()
    );
    assert_eq!(namespaces(&lab.socket(0)).len(), 2);
    assert_eq!(namespaces(&lab.socket(1)).len(), 3);

    // An edit converges without being asked.
    let edited = Instant::now();
    lab.write(
        &c,
        &[
            (&keep, 0, "128Mi", "Retain"),
            (&grow, 0, "256Mi", "Retain"),
            (&ret, 1, "64Mi", "Retain"),
            (&trash, 1, "64Mi", "Trash"),
            (&del, 1, "64Mi", "Delete"),
        ],
    );
    d.wait_for(CONVERGE, "the grown volume", |s| {
        reconciled(s)
            && volume(s, &grow)["size_bytes"] == 256u64 << 20
            && volume(s, &grow)["state"] == "ok"
    });
    println!(
        "manifest edit (grow) to convergence: {} ms",
        edited.elapsed().as_millis()
    );
    assert_eq!(
        c.rbd_info(&c.pool, &grow).unwrap()["size"].as_u64(),
        Some(256 << 20)
    );

    // Removals, each by its policy.
    lab.write(
        &c,
        &[(&keep, 0, "128Mi", "Retain"), (&grow, 0, "256Mi", "Retain")],
    );
    d.wait_for(CONVERGE, "three volumes removed", |s| {
        s["fleet"]["volumes"].as_array().map(Vec::len) == Some(2)
            && reconciled(s)
            && s["last_reconcile"]["result"] == "converged"
            && s["pending"].as_array().is_some_and(|p| p.is_empty())
    });
    assert!(
        namespaces(&lab.socket(1)).is_empty(),
        "detached from host-1"
    );
    assert!(
        c.rbd_info(&c.pool, &ret).is_some(),
        "Retain keeps the image"
    );
    assert!(c.rbd_info(&c.pool, &trash).is_none() && in_trash(&c, &trash));
    assert!(
        c.rbd_info(&c.pool, &del).is_none() && !in_trash(&c, &del),
        "Delete deletes"
    );

    // A broken manifest is reported and changes nothing.
    let before = namespaces(&lab.socket(0));
    std::fs::write(
        lab.manifests().join("volumes.yaml"),
        volume_yaml(&keep, 0, "128Mi", &c.pool, "Retain").replace("size:", "sise:"),
    )
    .unwrap();
    let s = d.wait_for(Duration::from_secs(30), "the manifest error", |s| {
        s["manifests"]["valid"] == false
    });
    let err = s["manifests"]["error"].as_str().unwrap();
    assert!(
        err.contains("volumes.yaml:") && err.contains("sise"),
        "names file, line and field: {err}"
    );
    d.reconcile_now(CONVERGE);
    assert_eq!(
        namespaces(&lab.socket(0)),
        before,
        "the last good manifests stay in force"
    );
    assert_eq!(d.status()["fleet"]["volumes"].as_array().unwrap().len(), 2);

    // Metrics, and `unistor status` reads from the daemon.
    let metrics = d.get("/metrics");
    for line in [
        "unistor_volumes_converged 2",
        "unistor_manifests_valid 0",
        "unistor_reconciles_total{result=\"converged\"}",
        "unistor_steps_total{outcome=\"done\"}",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    let m = lab.manifests().display().to_string();
    let pki = lab.pki().display().to_string();
    let st = unistor(&["status", &m, "--pki-dir", &pki, "--daemon", &d.url]);
    assert!(st.status.success(), "{}", show(&st));
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(text.contains("From the watch daemon"), "{text}");
}

#[test]
fn snap_state_is_restored_by_the_daemon_and_the_dashboard_shows_it() {
    let c = Cluster::from_env();
    // --no-replay: the agent only reports what SNAP lost; the daemon restores it.
    let lab = Lab::start(&c, 1, &["--no-replay"]);
    let [a, b] = ["dash-a", "dash-b"].map(unique);
    lab.write(&c, &[(&a, 0, "64Mi", "Retain"), (&b, 0, "128Mi", "Retain")]);
    let d = lab.daemon(&[]);
    d.wait_converged(CONVERGE, 2);
    let before = namespaces(&lab.socket(0));
    assert_eq!(before.len(), 2);

    // SNAP dies and comes back empty; the daemon puts back the same NSIDs and UUIDs.
    let pids = emulator_pids(&lab.socket(0));
    assert_eq!(pids.len(), 1, "one emulator serves the socket");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restored = Instant::now();
    d.wait_for(CONVERGE, "SNAP restored", |s| {
        s["fleet"]["dpus"][0]["snap_restarts"].as_u64() >= Some(1)
            && s["last_reconcile"]["result"] == "converged"
            && s["fleet"]["volumes"]
                .as_array()
                .is_some_and(|v| v.iter().all(|v| v["state"] == "ok"))
    });
    println!(
        "SNAP restart to restored namespaces: {} ms",
        restored.elapsed().as_millis()
    );
    assert_eq!(
        namespaces(&lab.socket(0)),
        before,
        "same bdevs, NSIDs and UUIDs"
    );

    // The dashboard in a real browser: every volume's chain complete.
    let dom = browser_dom(&format!("{}/", d.url));
    assert!(dom.contains(r#"data-loaded="true""#), "{dom}");
    for v in [&a, &b] {
        assert!(
            dom.contains(&format!(r#"data-volume="{v}" data-state="ok""#)),
            "{v} ok in:\n{dom}"
        );
    }
    // The host opens b's device: status and the dashboard say so.
    let s = d.status();
    let dev = std::path::PathBuf::from(volume(&s, &b)["host_device"].as_str().unwrap());
    let holder = e2e::host::Opener::open(&dev);
    d.wait_for(Duration::from_secs(30), "the host's use to show", |s| {
        // a is on the same controller, which the host's driver now has enabled.
        volume(s, &b)["host_use"] == "open" && volume(s, &a)["host_use"] == "enabled"
    });
    let dom = browser_dom(&format!("{}/", d.url));
    let row = |v: &str| {
        dom.split("<tr")
            .find(|r| r.contains(&format!(r#"data-volume="{v}""#)))
            .unwrap_or_else(|| panic!("a row for {v} in:\n{dom}"))
            .to_string()
    };
    assert!(row(&b).contains(r#"data-host-use="open""#), "{}", row(&b));
    assert!(row(&b).contains("open by 1"), "{}", row(&b));
    assert!(
        row(&a).contains(r#"data-host-use="enabled""#),
        "{}",
        row(&a)
    );
    drop(holder);

    // Suspended, a volume's drift is shown and left alone; the first broken link is marked.
    let susp = unistor(&["suspend", &format!("volume/{a}"), "--daemon", &d.url]);
    assert!(susp.status.success(), "{}", show(&susp));
    c.cli_ok("rbd", &["trash", "mv", &format!("{}/{a}", c.pool)]);
    d.wait_for(c.sweep_bound(&c.pool), "the trashed image to show", |s| {
        volume(s, &a)["state"] == "degraded" && volume(s, &a)["suspended"] == true
    });
    let dom = browser_dom(&format!("{}/", d.url));
    let row = dom
        .split("<tr")
        .find(|r| r.contains(&format!(r#"data-volume="{a}""#)))
        .unwrap_or_else(|| panic!("a row for {a} in:\n{dom}"));
    assert!(
        row.contains(r#"class="link-broken" data-link="image" data-state="broken""#)
            || (row.contains("link-broken") && row.contains(r#"data-link="image""#)),
        "the image link is marked broken:\n{row}"
    );
    assert!(row.contains("suspended"), "{row}");
    d.reconcile_now(CONVERGE);
    assert!(in_trash(&c, &a), "a suspended volume is left alone");

    // Resumed, it is healed.
    let res = unistor(&["resume", &format!("volume/{a}"), "--daemon", &d.url]);
    assert!(res.status.success(), "{}", show(&res));
    d.wait_converged(CONVERGE, 2);
    assert!(c.rbd_info(&c.pool, &a).is_some(), "restored from the trash");
}

#[test]
fn an_apply_interrupted_by_a_dead_agent_finishes_when_it_is_back() {
    let c = Cluster::from_env();
    // Slow SNAP, so that the agent dies in the middle of the work.
    let mut lab = Lab::start(&c, 1, &["--emulator-arg=--latency=*=300ms"]);
    let vols: Vec<String> = (0..3).map(|i| unique(&format!("mid{i}"))).collect();
    let spec: Vec<(&str, usize, &str, &str)> = vols
        .iter()
        .map(|v| (v.as_str(), 0, "64Mi", "Retain"))
        .collect();
    lab.write(&c, &spec);
    let d = lab.daemon(&[]);
    d.wait_for(CONVERGE, "the first SNAP steps done", |s| {
        s["events"].as_array().is_some_and(|e| {
            e.iter()
                .filter(|e| {
                    e["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("done: + dpu/"))
                })
                .count()
                >= 3
        })
    });
    let agent = &mut lab.procs.0[1];
    agent.kill().unwrap();
    agent.wait().unwrap();
    for pid in emulator_pids(&lab.socket(0)) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let s = d.wait_for(Duration::from_secs(30), "the session to drop", |s| {
        s["agents"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["connected"] == false))
    });
    assert_ne!(s["last_reconcile"]["result"], "converged", "{s}");
    // Meanwhile, a plan cannot say "no changes" about a DPU it cannot see.
    let m = lab.manifests().display().to_string();
    let pki = lab.pki().display().to_string();
    let plan = unistor(&["plan", &m, "--pki-dir", &pki, "--owner", &lab.owner]);
    assert_eq!(plan.status.code(), Some(1), "{}", show(&plan));
    assert!(
        String::from_utf8_lossy(&plan.stderr).contains("could not be observed"),
        "{}",
        show(&plan)
    );
    lab.start_dpu(0);
    d.wait_converged(CONVERGE, 3);
    let ns = namespaces(&lab.socket(0));
    assert_eq!(ns.len(), 3, "one namespace per volume: {ns:?}");
    let bdevs = snap_call(&lab.socket(0), "bdev_get_bdevs");
    assert_eq!(bdevs.as_array().unwrap().len(), 3, "{bdevs}");
}

#[test]
fn a_controller_killed_in_the_middle_of_an_apply_leaves_nothing_twice() {
    let c = Cluster::from_env();
    let lab = Lab::start(&c, 1, &["--emulator-arg=--latency=*=300ms"]);
    let vols: Vec<String> = (0..3).map(|i| unique(&format!("ctl{i}"))).collect();
    let spec: Vec<(&str, usize, &str, &str)> = vols
        .iter()
        .map(|v| (v.as_str(), 0, "64Mi", "Retain"))
        .collect();
    lab.write(&c, &spec);
    let m = lab.manifests().display().to_string();
    let pki = lab.pki().display().to_string();
    let args = [
        "apply",
        m.as_str(),
        "--pki-dir",
        &pki,
        "--owner",
        &lab.owner,
        "--auto-approve",
    ];
    let mut apply = std::process::Command::new(e2e::bin("unistor"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it after a few SNAP steps are done.
    {
        use std::io::BufRead;
        let out = std::io::BufReader::new(apply.stdout.take().unwrap());
        let mut done = 0;
        for line in out.lines() {
            let line = line.unwrap();
            if line.contains("+ dpu/") && line.ends_with("... done") {
                done += 1;
                if done == 4 {
                    break;
                }
            }
        }
        assert_eq!(done, 4, "the apply got going");
    }
    apply.kill().unwrap();
    apply.wait().unwrap();
    let partial = namespaces(&lab.socket(0)).len();
    assert!(partial < 3, "killed before the end ({partial} namespaces)");

    let second = unistor(&args);
    assert!(second.status.success(), "{}", show(&second));
    let plan = unistor(&["plan", &m, "--pki-dir", &pki, "--owner", &lab.owner]);
    assert_eq!(plan.status.code(), Some(0), "{}", show(&plan));
    assert_eq!(namespaces(&lab.socket(0)).len(), 3);
    let bdevs = snap_call(&lab.socket(0), "bdev_get_bdevs");
    assert_eq!(bdevs.as_array().unwrap().len(), 3, "{bdevs}");
    for v in &vols {
        assert!(c.rbd_info(&c.pool, v).is_some());
    }
}

#[test]
fn report_only_mode_shows_what_it_would_do_and_does_nothing() {
    let c = Cluster::from_env();
    let lab = Lab::start(&c, 1, &[]);
    let v = unique("ro");
    lab.write(&c, &[(&v, 0, "64Mi", "Retain")]);
    let d = lab.daemon(&["--no-heal"]);
    let s = d.wait_for(CONVERGE, "a report-only reconcile", |s| {
        reconciled(s) && s["last_reconcile"]["result"] == "drift"
    });
    assert_eq!(s["heal"], false);
    let pending = s["pending"].as_array().unwrap();
    assert!(
        pending
            .iter()
            .any(|p| p.as_str().unwrap().contains("create image")),
        "{s}"
    );
    d.reconcile_now(CONVERGE);
    assert!(c.rbd_info(&c.pool, &v).is_none(), "nothing created");
    assert!(
        !lab.socket(0).exists() || namespaces(&lab.socket(0)).is_empty(),
        "nothing on SNAP"
    );
    let metrics = d.get("/metrics");
    assert!(
        metrics.contains("unistor_reconciles_total{result=\"drift\"}"),
        "{metrics}"
    );
}

#[test]
fn a_manifest_directory_swapped_like_git_sync_is_followed() {
    let c = Cluster::from_env();
    let lab = Lab::start(&c, 1, &[]);
    let v = unique("sync");
    // git-sync: `current` is a symlink to a worktree, replaced by a rename for every commit.
    let root = lab.dir.path().join("sync");
    let current = root.join("current");
    lab.write_in(&root.join("rev1"), &c, &[(&v, 0, "64Mi", "Retain")]);
    std::os::unix::fs::symlink("rev1", &current).unwrap();
    let d = lab.daemon_on(&current, &[]);
    d.wait_converged(CONVERGE, 1);

    let vol = v.as_str();
    let size_is = move |bytes: u64| {
        move |s: &Value| {
            reconciled(s)
                && volume(s, vol)["size_bytes"] == bytes
                && volume(s, vol)["state"] == "ok"
        }
    };
    lab.write_in(&root.join("rev2"), &c, &[(&v, 0, "128Mi", "Retain")]);
    std::os::unix::fs::symlink("rev2", root.join("current.new")).unwrap();
    std::fs::rename(root.join("current.new"), &current).unwrap();
    d.wait_for(CONVERGE, "the swapped-in revision", size_is(128 << 20));

    // And edits inside the new worktree are seen (the watch moved with the symlink).
    lab.write_in(&root.join("rev2"), &c, &[(&v, 0, "192Mi", "Retain")]);
    d.wait_for(CONVERGE, "an edit in the new worktree", size_is(192 << 20));
}

#[test]
fn a_stopping_daemon_ends_its_pass_at_a_step_boundary() {
    let c = Cluster::from_env();
    // Slow SNAP, so that SIGTERM arrives in the middle of the work.
    let lab = Lab::start(&c, 1, &["--emulator-arg=--latency=*=300ms"]);
    let vols: Vec<String> = (0..3).map(|i| unique(&format!("stop{i}"))).collect();
    let spec: Vec<(&str, usize, &str, &str)> = vols
        .iter()
        .map(|v| (v.as_str(), 0, "64Mi", "Retain"))
        .collect();
    lab.write(&c, &spec);
    let mut d = lab.daemon(&[]);
    // A bdev created: the pass that made it observed both agents, and still has that volume's
    // namespace, attach and resume ahead (300 ms each). Waiting for less is a race seen in CI:
    // a pass begun before an agent's first report skips that agent's steps at once ("connecting")
    // and can end before the signal with nothing left to skip.
    d.wait_for(CONVERGE, "the first bdev created", |s| {
        s["events"].as_array().is_some_and(|e| {
            e.iter().any(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("done: + dpu/dpu-0 create bdev"))
            })
        })
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // It exits by itself, cleanly, once the steps in flight are done.
    let mut status = None;
    e2e::wait_until(Duration::from_secs(60), "the daemon to exit", || {
        status = d.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "{status:?}");
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(
        log.contains("stopping: a pass in progress ends at a step boundary"),
        "{log}"
    );
    assert!(
        log.contains("stopping: not started"),
        "steps not started are skipped:\n{log}"
    );
    // A new daemon finishes the work: nothing done twice, nothing half-done left behind.
    let d = lab.daemon(&[]);
    d.wait_converged(CONVERGE, 3);
    assert_eq!(namespaces(&lab.socket(0)).len(), 3);
    let bdevs = snap_call(&lab.socket(0), "bdev_get_bdevs");
    assert_eq!(bdevs.as_array().unwrap().len(), 3, "{bdevs}");
}

/// A namespace deleted out of band through SNAP's socket while SNAP runs: with `--no-heal`
/// nobody repairs it (the agent does not replay drift) and the daemon reports it; in heal mode
/// the daemon repairs it with the same NSID and UUID. Either way it is drift, not a restart.
#[test]
fn an_out_of_band_delete_is_drift_reported_in_report_only_and_repaired_when_healing() {
    let c = Cluster::from_env();
    let lab = Lab::start(&c, 1, &[]);
    let a = unique("drift");
    lab.write(&c, &[(&a, 0, "64Mi", "Retain")]);
    let healing = lab.daemon(&[]);
    healing.wait_converged(CONVERGE, 1);
    drop(healing);
    let before = namespaces(&lab.socket(0));
    assert_eq!(before.len(), 1);
    let report_only = lab.daemon(&["--no-heal"]);
    report_only.wait_for(CONVERGE, "the report-only daemon sees the fleet", |s| {
        volume(s, &a)["state"] == "ok"
    });
    let (nqn, _) = e2e::lab::destroy_first_namespace(&lab.socket(0));
    let s = report_only.wait_for(CONVERGE, "the drift reported", |s| {
        volume(s, &a)["state"] == "degraded"
            && s["events"].as_array().is_some_and(|e| {
                e.iter().any(|e| {
                    e["kind"] == "drift"
                        && e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("out of band") && m.contains(&nqn))
                })
            })
    });
    assert_eq!(s["fleet"]["dpus"][0]["snap_restarts"], 0, "not a restart");
    report_only.reconcile_now(CONVERGE);
    assert!(
        namespaces(&lab.socket(0)).is_empty(),
        "left deleted: nobody heals in report-only"
    );
    drop(report_only);

    let healing = lab.daemon(&[]);
    let s = healing.wait_converged(CONVERGE, 1);
    assert_eq!(namespaces(&lab.socket(0)), before, "the same NSID and UUID");
    assert_eq!(
        s["fleet"]["dpus"][0]["snap_restarts"], 0,
        "still not a restart"
    );
}

/// Takes volume `v`'s namespace away behind unistor's back (detached, destroyed) on SNAP at
/// `socket`. A healing daemon may have put it back by the time this returns (its agent can
/// poll SNAP in between), so whether it is still gone is the caller's to check.
fn destroy_namespace_out_of_band(socket: &std::path::Path) {
    let subs = snap_call(socket, "nvme_subsystem_list");
    let s = &subs[0];
    let nqn = s["nqn"].as_str().unwrap().to_string();
    let nsid = s["namespaces"][0]["nsid"].as_u64().unwrap();
    let ctrl = s["controllers"][0]["ctrl_id"].as_str().unwrap().to_string();
    e2e::try_snap_call_with(
        socket,
        "nvme_controller_detach_ns",
        serde_json::json!({"ctrl_id": ctrl, "nsid": nsid}),
    )
    .unwrap();
    e2e::try_snap_call_with(
        socket,
        "nvme_namespace_destroy",
        serde_json::json!({"nqn": nqn, "nsid": nsid}),
    )
    .unwrap();
}

fn median(mut v: Vec<u128>) -> u128 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Drift heals in seconds: a namespace destroyed out of band comes back as soon as the agent
/// reports it gone (the report is pushed at its next poll; the daemon reconciles on it), and
/// in report-only mode it shows in `/api/v1/status` as fast. Latencies printed (medians of 5).
#[test]
fn drift_is_healed_or_shown_within_seconds_of_the_agent_seeing_it() {
    let c = Cluster::from_env();
    // --no-replay: the agent reports the loss and leaves the repair to the controller.
    let lab = Lab::start(&c, 1, &["--no-replay"]);
    let v = unique("drift");
    lab.write(&c, &[(&v, 0, "64Mi", "Retain")]);
    let socket = lab.socket(0);
    let mut healed = vec![];
    {
        let d = lab.daemon(&[]);
        d.wait_converged(CONVERGE, 1);
        let before = namespaces(&socket);
        for _ in 0..5 {
            destroy_namespace_out_of_band(&socket);
            let t = Instant::now();
            e2e::wait_until(CONVERGE, "the namespace back", || {
                namespaces(&socket) == before
            });
            healed.push(t.elapsed().as_millis());
        }
        // Its heal finished (attached, resumed) before the next daemon looks.
        d.wait_converged(CONVERGE, 1);
    }
    let mut shown = vec![];
    {
        let d = lab.daemon(&["--no-heal"]);
        let link = |s: &Value| {
            volume(s, &v)["chain"]
                .as_array()
                .and_then(|c| c.iter().find(|l| l["link"] == "namespace"))
                .map(|l| l["state"].as_str().unwrap_or("").to_string())
        };
        for round in 0..5 {
            d.wait_for(CONVERGE, "the namespace seen ok", |s| {
                link(s).as_deref() == Some("ok")
            });
            destroy_namespace_out_of_band(&socket);
            // Report-only: nothing puts it back.
            assert!(namespaces(&socket).is_empty());
            let t = Instant::now();
            d.wait_for(CONVERGE, "the drift in the status", |s| {
                link(s).as_deref().is_some_and(|l| l != "ok")
            });
            shown.push(t.elapsed().as_millis());
            if round < 4 {
                // Put back by hand (report-only changes nothing) for the next round.
                let back = unistor(&[
                    "apply",
                    lab.manifests().to_str().unwrap(),
                    "--pki-dir",
                    lab.pki().to_str().unwrap(),
                    "--owner",
                    &lab.owner,
                    "--auto-approve",
                ]);
                assert!(back.status.success(), "{}", show(&back));
            }
        }
        // And a reconcile asked for now plans against it: the namespace is a step to run.
        let s = d.reconcile_now(CONVERGE);
        assert_ne!(
            s["last_reconcile"]["result"], "converged",
            "{}",
            s["last_reconcile"]
        );
    }
    println!(
        "drift heal latency (ms): {healed:?} median {}; report-only shown (ms): {shown:?}",
        median(healed.clone())
    );
}
