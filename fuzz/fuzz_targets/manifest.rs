//! The manifest loader: any text as a manifest file, beside a valid cluster and DPU so that
//! volumes in the input resolve against something. It must answer (a set, or errors naming
//! file, line and field), never panic, loop or blow up.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;

const BASE: &str = "apiVersion: unistor.io/v1alpha1
kind: CephCluster
metadata: {name: ceph}
spec:
  agent: {name: ceph-1, address: 127.0.0.1:7400}
  pools: [rbd]
  snapIdentity: {clientId: snap}
---
apiVersion: unistor.io/v1alpha1
kind: Dpu
metadata: {name: dpu-a}
spec:
  agent: {name: dpu-a, address: 127.0.0.1:7411}
  host: host-a
  snap: {version: 4.5.0, functions: {pfs: 2, vfsPerPf: 4}}
";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let texts = [
        (PathBuf::from("base.yaml"), BASE.to_string()),
        (PathBuf::from("fuzz.yaml"), text.to_string()),
    ];
    match controller::manifest::load_texts(&texts) {
        Ok(d) => {
            // What resolves is within the bounds every later step relies on.
            for v in d.volumes.values() {
                assert!(v.size_bytes <= protocol::limits::MAX_VOLUME_BYTES);
                assert!(v.trash_retention.as_secs() <= protocol::limits::MAX_RETENTION_SECS);
            }
        }
        Err(errors) => assert!(!errors.is_empty()),
    }
});
