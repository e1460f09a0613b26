//! The fleet simulator end to end: many DPUs in one `fleet-sim` process, each a dpu-agent
//! endpoint of its own over its own SNAP emulator (real-Ceph mode), converged by the watch
//! daemon; part of the fleet lost and found again.

use std::time::Duration;

use e2e::{
    fleet_yaml, issue_pki, reconciled, spawn_ceph_agent, unique, volume_yaml, write_like_an_editor,
    Cluster, Daemon, FleetSim, Procs,
};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(180);
const DPUS: usize = 12;
const PER_DPU: usize = 2;

fn volumes(s: &Value) -> &[Value] {
    s["fleet"]["volumes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

#[test]
fn a_fleet_in_one_process_converges_and_survives_losing_part_of_it() {
    let c = Cluster::from_env();
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let ceph = unique("ceph-fleet");
    issue_pki(&pki, &[&ceph]);
    let mut procs = Procs::default();
    let ceph_addr = spawn_ceph_agent(&mut procs, &c, &ceph, &pki, &dir.path().join("ceph"));
    let prefix = unique("fsim");
    let mut fleet = FleetSim::start(
        &pki,
        &dir.path().join("fleet"),
        &prefix,
        DPUS,
        &["--real-ceph", "--poll-interval", "1s", "--heartbeat", "2s"],
    );
    // Every DPU is its own endpoint: its own name and port.
    let ports: std::collections::BTreeSet<&str> =
        fleet.agents.iter().map(|(_, a)| a.as_str()).collect();
    assert_eq!(ports.len(), DPUS, "{:?}", fleet.agents);

    let m = dir.path().join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    let pairs: Vec<(&str, &str)> = fleet
        .agents
        .iter()
        .map(|(n, a)| (n.as_str(), a.as_str()))
        .collect();
    std::fs::write(
        m.join("fleet.yaml"),
        fleet_yaml(&ceph, &ceph_addr, &c.pool, &unique("snap-fleet"), &pairs),
    )
    .unwrap();
    let names: Vec<String> = (0..DPUS * PER_DPU)
        .map(|i| unique(&format!("fv{i}")))
        .collect();
    // Volume i on DPU i / PER_DPU, but `grown` at 128 MiB and `moved` (volume, DPU) elsewhere.
    let write = |grown: Option<usize>, moved: Option<(usize, usize)>| {
        let text: String = names
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let size = if grown == Some(i) { "128Mi" } else { "64Mi" };
                let dpu = match moved {
                    Some((m, to)) if m == i => to,
                    _ => i / PER_DPU,
                };
                volume_yaml(v, dpu, size, &c.pool, "Retain")
            })
            .collect();
        write_like_an_editor(&m.join("volumes.yaml"), &text);
    };
    write(None, None);
    let owner = unique("fleet");
    let d = Daemon::start(
        &[
            m.to_str().unwrap(),
            "--pki-dir",
            pki.to_str().unwrap(),
            "--owner",
            &owner,
            "--state-dir",
            dir.path().join("watch").to_str().unwrap(),
        ],
        &dir.path().join("watch.log"),
    );
    d.wait_converged(CONVERGE, DPUS * PER_DPU);
    assert_eq!(fleet.command("exposed-twice"), "exposed twice: 0");
    dashboard_leads_with_counts_and_charts(&d);
    let stats = fleet.stats();
    assert_eq!(stats["up"], DPUS, "{stats}");
    assert!(stats["accepted"].as_u64() >= Some(DPUS as u64), "{stats}");

    // Three DPUs go away: their volumes are Unknown and untouched, the others keep converging.
    assert_eq!(fleet.command("stop 0 2"), "stopped 3");
    let lost: Vec<&String> = names[..3 * PER_DPU].iter().collect();
    d.wait_for(CONVERGE, "the lost DPUs' volumes unknown", |s| {
        volumes(s)
            .iter()
            .filter(|v| lost.iter().any(|n| v["volume"] == n.as_str()))
            .all(|v| v["state"] == "unknown")
    });
    let grown = names.len() - 1;
    write(Some(grown), None);
    let s = d.wait_for(CONVERGE, "the edit on a DPU still up", |s| {
        reconciled(s)
            && volumes(s).iter().any(|v| {
                v["volume"] == names[grown].as_str()
                    && v["size_bytes"] == 128u64 << 20
                    && v["state"] == "ok"
            })
    });
    for v in volumes(&s)
        .iter()
        .filter(|v| lost.iter().any(|n| v["volume"] == n.as_str()))
    {
        assert_eq!(v["state"], "unknown", "{v}");
    }
    for n in &lost {
        assert!(c.rbd_info(&c.pool, n).is_some(), "image {n} kept");
    }
    // The counts and the problems lead; the API filters and pages.
    let s = d.status_at("state=unknown&limit=4");
    let sum = &s["fleet"]["summary"];
    assert_eq!(sum["volumes_unknown"], 3 * PER_DPU, "{sum}");
    assert_eq!(
        (sum["dpus_down"].as_u64(), sum["dpus_up"].as_u64()),
        (Some(3), Some(DPUS as u64 - 3))
    );
    assert_eq!(s["fleet"]["page"]["volumes_matched"], 3 * PER_DPU);
    assert_eq!(volumes(&s).len(), 4, "a page of 4");
    assert!(volumes(&s).iter().all(|v| v["state"] == "unknown"));
    assert_eq!(s["agents_connected"], DPUS + 1 - 3);
    let dom = e2e::browser_dom(&format!("{}/", d.url));
    let problems = section(&dom, r#"id="problems""#, "</ul>");
    for i in 0..3 {
        assert!(
            problems.contains(&format!("DPU dpu-{i}: unknown")),
            "{problems}"
        );
    }
    assert!(!problems.contains("DPU dpu-3:"), "{problems}");

    // They come back (SNAP kept running): nothing is replaced, everything converges.
    let before = d.steps_done();
    assert_eq!(fleet.command("start 0 2"), "started 3");
    d.wait_converged(CONVERGE, DPUS * PER_DPU);
    d.reconcile_now(CONVERGE);
    assert_eq!(
        d.steps_done(),
        before,
        "no step ran for the DPUs that came back"
    );
    assert_eq!(fleet.command("exposed-twice"), "exposed twice: 0");

    // A volume of dpu-0 moves to the last DPU while dpu-0 is away: held meanwhile (its SNAP
    // may still serve it), then moved once dpu-0 is back; never on both.
    assert_eq!(fleet.command("stop 0 0"), "stopped 1");
    write(Some(grown), Some((0, DPUS - 1)));
    d.wait_for(CONVERGE, "the move held for dpu-0", |s| {
        s["blocked"].as_array().is_some_and(|b| {
            b.iter().any(|b| {
                b["object"] == format!("volume/{}", names[0]).as_str()
                    && b["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("not reporting"))
            })
        })
    });
    assert_eq!(fleet.command("exposed-twice"), "exposed twice: 0");
    assert_eq!(fleet.command("start 0 0"), "started 1");
    let s = d.wait_converged(CONVERGE, DPUS * PER_DPU);
    assert!(
        volumes(&s).iter().any(|v| v["volume"] == names[0].as_str()
            && v["dpu"] == format!("dpu-{}", DPUS - 1).as_str()),
        "moved"
    );
    assert_eq!(fleet.command("exposed-twice"), "exposed twice: 0");
    drop(d);
    drop(fleet);
}

/// The HTML from `marker` to the first `end` after it.
fn section<'a>(dom: &'a str, marker: &str, end: &str) -> &'a str {
    let at = dom
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} in:\n{dom}"));
    let rest = &dom[at..];
    &rest[..rest.find(end).unwrap_or(rest.len())]
}

/// The dashboard in headless chromium: the counts and the three charts of the last hour, and
/// a screenshot of it.
fn dashboard_leads_with_counts_and_charts(d: &Daemon) {
    let dom = e2e::browser_dom(&format!("{}/", d.url));
    assert!(dom.contains(r#"data-loaded="true""#), "{dom}");
    let counts = section(&dom, r#"data-count="volumes""#, "</div></div>");
    assert!(
        counts.contains(&format!(">{}<", DPUS * PER_DPU)),
        "{counts}"
    );
    assert!(
        counts.contains(&format!("{} ok", DPUS * PER_DPU)),
        "{counts}"
    );
    let agents = section(&dom, r#"data-count="agents""#, "</div></div>");
    assert!(agents.contains(&format!(">{0}/{0}<", DPUS + 1)), "{agents}");
    for chart in ["reconcile", "pending", "agents"] {
        let fig = section(&dom, &format!(r#"data-chart="{chart}""#), "</figure>");
        let points = fig
            .split(r#"points=""#)
            .nth(1)
            .and_then(|p| p.split('"').next())
            .unwrap_or_else(|| panic!("a line in {fig}"));
        assert!(!points.trim().is_empty(), "chart {chart} has points: {fig}");
    }
    // The top of the page as a person sees it: the counts (green when all is well) and the
    // charts (blue lines and dots) are drawn there, nothing else of those colours.
    let png = e2e::browser_screenshot(&format!("{}/", d.url), 320);
    let green = e2e::pixels_like(&png, [0x1a, 0x7f, 0x37], 40);
    let blue = e2e::pixels_like(&png, [0x09, 0x69, 0xda], 40);
    println!("screenshot: {green} green, {blue} blue pixels");
    assert!(green >= 100, "the counts are drawn: {green} green pixels");
    assert!(blue >= 20, "the charts are drawn: {blue} blue pixels");
}
