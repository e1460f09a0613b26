//! A lab for end-to-end tests: a ceph-agent and simulated DPUs (dpu-agent + SNAP emulator in
//! real-Ceph mode, with a simulated host) on the real cluster, manifests, and the watch daemon.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{
    ceph_agent_command, dpu_agent_command, fleet_yaml, issue_pki, snap_call, spawn_announced,
    unique, volume_yaml, write_like_an_editor, Cluster, Daemon, Procs, ANY_PORT,
};

/// A ceph-agent (cluster report every 2 s) and `n` dpu-agents, each with `dpu_args`.
pub struct Lab {
    /// Everything of the lab lives here.
    pub dir: tempfile::TempDir,
    /// The ceph-agent's name.
    pub ceph_agent: String,
    /// Its address.
    pub ceph_addr: String,
    /// DPU names and addresses.
    pub dpus: Vec<(String, String)>,
    /// Extra dpu-agent arguments.
    pub dpu_args: Vec<String>,
    /// Every process started (agents; emulators are in their agents' process groups).
    pub procs: Procs,
    /// The controller owner.
    pub owner: String,
    /// SNAP's cephx id.
    pub snap_id: String,
    /// Environment every agent of the lab is started with (e.g. the clock seam).
    pub env: Vec<(String, PathBuf)>,
}

impl Lab {
    pub fn start(c: &Cluster, n: usize, dpu_args: &[&str]) -> Self {
        Self::start_with_env(c, n, dpu_args, &[])
    }

    /// [`Lab::start`], every agent with `env` set too.
    pub fn start_with_env(
        c: &Cluster,
        n: usize,
        dpu_args: &[&str],
        env: &[(String, PathBuf)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ceph_agent = unique("ceph-w");
        let dpu_names: Vec<String> = (0..n).map(|i| unique(&format!("dpu-w{i}"))).collect();
        let mut agents: Vec<&str> = vec![&ceph_agent];
        agents.extend(dpu_names.iter().map(String::as_str));
        issue_pki(&dir.path().join("pki"), &agents);
        let mut lab = Lab {
            ceph_addr: String::new(),
            ceph_agent,
            dpus: vec![],
            dpu_args: dpu_args.iter().map(|s| s.to_string()).collect(),
            procs: Procs::default(),
            owner: unique("owner"),
            snap_id: unique("snap-w"),
            env: env.to_vec(),
            dir,
        };
        let (child, addr) = spawn_announced(
            ceph_agent_command(
                c,
                &lab.ceph_agent,
                ANY_PORT,
                &lab.pki(),
                &lab.dir.path().join("ceph-state"),
            )
            .args(["--report-interval", "2s"])
            .args(crate::QUICK_SWEEP)
            .envs(lab.env.iter().map(|(k, v)| (k, v))),
            "listening on ",
        );
        lab.procs.0.push(child);
        lab.ceph_addr = addr;
        for (i, name) in dpu_names.into_iter().enumerate() {
            // The system picks the port; a restart binds the same one again.
            lab.dpus.push((name, ANY_PORT.to_string()));
            lab.start_dpu(i);
        }
        std::fs::create_dir_all(lab.manifests()).unwrap();
        lab
    }

    /// Starts dpu-agent `i` on its state directory: the first time on a port the system picks,
    /// then (a restart, after the previous agent exited) on the same address, which the
    /// manifests name. Returns the index of its process in `procs`.
    pub fn start_dpu(&mut self, i: usize) -> usize {
        let (name, addr) = &self.dpus[i];
        let extra: Vec<&str> = self.dpu_args.iter().map(String::as_str).collect();
        let (child, bound) = spawn_announced(
            dpu_agent_command(name, addr, &self.pki(), &self.state(i), &extra)
                .envs(self.env.iter().map(|(k, v)| (k, v))),
            "listening on ",
        );
        self.dpus[i].1 = bound;
        self.procs.0.push(child);
        self.procs.0.len() - 1
    }

    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }
    pub fn state(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("dpu{i}"))
    }
    pub fn socket(&self, i: usize) -> PathBuf {
        self.state(i).join("spdk.sock")
    }
    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }
    /// DPU `i`'s simulated host: its devices and `host.json`.
    pub fn host_dir(&self, i: usize) -> PathBuf {
        self.state(i).join("host")
    }

    /// Writes the fleet and `volumes` (name, dpu index, size, policy).
    pub fn write(&self, c: &Cluster, volumes: &[(&str, usize, &str, &str)]) {
        self.write_in(&self.manifests(), c, volumes);
    }

    /// Writes the fleet and `volumes` into `dir`.
    pub fn write_in(&self, dir: &Path, c: &Cluster, volumes: &[(&str, usize, &str, &str)]) {
        std::fs::create_dir_all(dir).unwrap();
        let dpus: Vec<(&str, &str)> = self
            .dpus
            .iter()
            .map(|(n, a)| (n.as_str(), a.as_str()))
            .collect();
        write_like_an_editor(
            &dir.join("fleet.yaml"),
            &fleet_yaml(
                &self.ceph_agent,
                &self.ceph_addr,
                &c.pool,
                &self.snap_id,
                &dpus,
            ),
        );
        let vols: String = volumes
            .iter()
            .map(|(n, h, s, p)| volume_yaml(n, *h, s, &c.pool, p))
            .collect();
        write_like_an_editor(&dir.join("volumes.yaml"), &vols);
    }

    /// `unistor watch` on the manifests, with `extra` flags.
    pub fn daemon(&self, extra: &[&str]) -> Daemon {
        self.daemon_on(&self.manifests(), extra)
    }

    /// `unistor watch` on the manifest directory `dir`, with `extra` flags.
    pub fn daemon_on(&self, dir: &Path, extra: &[&str]) -> Daemon {
        self.daemon_named(dir, "watch", extra)
    }

    /// `unistor watch` as replica `name` of the lab's deployment (issue 24): coordinating in
    /// the cluster's pool as its admin, membership lease `ttl`; state and log of its own
    /// (`<name>/`, `<name>.log`).
    pub fn replica(&self, c: &Cluster, name: &str, ttl: &str, extra: &[&str]) -> Daemon {
        let (conf, keyring) = (
            c.conf.display().to_string(),
            c.keyring.display().to_string(),
        );
        let mut args = vec![
            "--replicas-in",
            &c.pool,
            "--replica-name",
            name,
            "--replica-ttl",
            ttl,
            "--rados-conf",
            &conf,
            "--rados-id",
            &c.id,
            "--rados-keyring",
            &keyring,
        ];
        args.extend_from_slice(extra);
        self.daemon_named(&self.manifests(), name, &args)
    }

    fn daemon_named(&self, dir: &Path, name: &str, extra: &[&str]) -> Daemon {
        let m = dir.display().to_string();
        let pki = self.pki().display().to_string();
        let state = self.dir.path().join(name).display().to_string();
        let mut args = vec![
            m.as_str(),
            "--pki-dir",
            &pki,
            "--owner",
            &self.owner,
            "--state-dir",
            &state,
            "--resync",
            "1h",
            "--debounce",
            "200ms",
        ];
        args.extend_from_slice(extra);
        Daemon::start(&args, &self.dir.path().join(format!("{name}.log")))
    }
}

/// Destroys the first namespace of SNAP at `socket` out of band, as an operator's stray RPC
/// would (detached from the first controller, then destroyed); returns its subsystem and NSID.
pub fn destroy_first_namespace(socket: &Path) -> (String, u64) {
    let subs = crate::snap_call(socket, "nvme_subsystem_list");
    let nqn = subs[0]["nqn"].as_str().expect("a subsystem").to_string();
    let nsid = subs[0]["namespaces"][0]["nsid"]
        .as_u64()
        .expect("a namespace");
    let ctrls = crate::snap_call(socket, "nvme_controller_list");
    let ctrl = ctrls[0]["ctrl_id"]
        .as_str()
        .expect("a controller")
        .to_string();
    for (method, params) in [
        (
            "nvme_controller_detach_ns",
            serde_json::json!({"ctrl_id": ctrl, "nsid": nsid}),
        ),
        (
            "nvme_namespace_destroy",
            serde_json::json!({"nqn": nqn, "nsid": nsid}),
        ),
    ] {
        crate::try_snap_call_with(socket, method, params).expect("the out-of-band call");
    }
    (nqn, nsid)
}

/// Namespaces SNAP has on `socket`: (bdev, nsid, uuid), sorted.
pub fn namespaces(socket: &Path) -> Vec<(String, u64, String)> {
    let subs = snap_call(socket, "nvme_subsystem_list");
    let mut out: Vec<(String, u64, String)> = subs
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .flat_map(|s| s["namespaces"].as_array().cloned().unwrap_or_default())
        .map(|n| {
            (
                n["bdev"].as_str().unwrap_or("?").to_string(),
                n["nsid"].as_u64().unwrap_or(0),
                n["uuid"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

pub fn volume<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["fleet"]["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["volume"] == name))
        .unwrap_or(&Value::Null)
}
