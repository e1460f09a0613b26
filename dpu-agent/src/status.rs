//! Facts about the machine the agent runs on, read from `/proc` and `/sys`.

use std::path::Path;

use protocol::dpu::{HostFacts, NetInterface};

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Reads host facts from `proc_root` (normally `/proc`) and `sys_root` (normally `/sys`).
/// Anything unreadable is left at its default: a report is never refused for a missing file.
pub fn host_facts(proc_root: &Path, sys_root: &Path) -> HostFacts {
    let mut f = HostFacts {
        hostname: read(&proc_root.join("sys/kernel/hostname"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        ..HostFacts::default()
    };
    if let Some(cpuinfo) = read(&proc_root.join("cpuinfo")) {
        f.cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count() as u32;
        f.cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                matches!(k.trim(), "model name" | "CPU part" | "cpu model")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
    }
    if let Some(meminfo) = read(&proc_root.join("meminfo")) {
        for line in meminfo.lines() {
            let mut parts = line.split_whitespace();
            let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let n: u64 = value.parse().unwrap_or(0);
            match key {
                "MemTotal:" => f.mem_total_bytes = n * 1024,
                "MemAvailable:" => f.mem_available_bytes = n * 1024,
                "HugePages_Total:" => f.hugepages_total = n,
                "HugePages_Free:" => f.hugepages_free = n,
                "Hugepagesize:" => f.hugepage_size_kib = n,
                _ => {}
            }
        }
    }
    if let Some(load) = read(&proc_root.join("loadavg")) {
        for (slot, v) in f.load.iter_mut().zip(load.split_whitespace()) {
            *slot = v.parse().unwrap_or(0.0);
        }
    }
    if let Some(up) = read(&proc_root.join("uptime")) {
        f.uptime_secs = up
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
    }
    if let Ok(dir) = std::fs::read_dir(sys_root.join("class/net")) {
        let mut ifs: Vec<NetInterface> = dir
            .flatten()
            .map(|e| {
                let p = e.path();
                let attr = |a: &str| read(&p.join(a)).map(|s| s.trim().to_string());
                NetInterface {
                    name: e.file_name().to_string_lossy().into_owned(),
                    state: attr("operstate").unwrap_or_default(),
                    mac: attr("address").unwrap_or_default(),
                    mtu: attr("mtu").and_then(|s| s.parse().ok()).unwrap_or(0),
                    // Reads fail (EINVAL) or give -1 while a link is down.
                    speed_mbps: attr("speed")
                        .and_then(|s| s.parse::<i64>().ok())
                        .filter(|s| *s > 0)
                        .map(|s| s as u32),
                }
            })
            .collect();
        ifs.sort_by(|a, b| a.name.cmp(&b.name));
        f.interfaces = ifs;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_facts() {
        let f = host_facts(Path::new("/proc"), Path::new("/sys"));
        assert!(f.cpus >= 1, "{f:?}");
        assert!(f.mem_total_bytes > 0 && f.mem_available_bytes <= f.mem_total_bytes);
        assert!(f.uptime_secs > 0);
        assert!(
            f.interfaces.iter().any(|i| i.name == "lo"),
            "{:?}",
            f.interfaces
        );
    }

    #[test]
    fn a_bluefield_like_tree_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("proc");
        let s = dir.path().join("sys");
        std::fs::create_dir_all(p.join("sys/kernel")).unwrap();
        std::fs::create_dir_all(s.join("class/net/p0")).unwrap();
        std::fs::write(p.join("sys/kernel/hostname"), "dpu-host07\n").unwrap();
        std::fs::write(
            p.join("cpuinfo"),
            "processor\t: 0\nCPU part\t: 0xd42\n\nprocessor\t: 1\nCPU part\t: 0xd42\n",
        )
        .unwrap();
        std::fs::write(
            p.join("meminfo"),
            "MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\nHugePages_Total:    2048\nHugePages_Free:     1024\nHugepagesize:       2048 kB\n",
        )
        .unwrap();
        std::fs::write(p.join("loadavg"), "0.50 0.40 0.30 1/200 1234\n").unwrap();
        std::fs::write(p.join("uptime"), "3600.5 7000.1\n").unwrap();
        std::fs::write(s.join("class/net/p0/operstate"), "up\n").unwrap();
        std::fs::write(s.join("class/net/p0/address"), "b8:3f:d2:00:00:01\n").unwrap();
        std::fs::write(s.join("class/net/p0/mtu"), "9000\n").unwrap();
        std::fs::write(s.join("class/net/p0/speed"), "200000\n").unwrap();
        let f = host_facts(&p, &s);
        assert_eq!(f.hostname, "dpu-host07");
        assert_eq!((f.cpus, f.cpu_model.as_str()), (2, "0xd42"));
        assert_eq!(
            (f.hugepages_total, f.hugepages_free, f.hugepage_size_kib),
            (2048, 1024, 2048)
        );
        assert_eq!(f.load, [0.5, 0.4, 0.3]);
        assert_eq!(f.uptime_secs, 3600);
        assert_eq!(f.interfaces[0].speed_mbps, Some(200_000));
        assert_eq!(f.interfaces[0].mtu, 9000);
    }
}
