//! The emulated PCI functions, as a BlueField-3 reports them in `emulation_function_list`.

use serde_json::{json, Value};

/// Static PFs a BlueField-3 offers for NVMe emulation (SNAP 4.1 firmware ranges).
pub const MAX_PFS: u32 = 4;
/// VFs per static PF.
pub const MAX_VFS_PER_PF: u32 = 127;

/// Identifies a function: PF index, and VF index for a VF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FnKey {
    /// PF index.
    pub pf: u32,
    /// VF index within the PF.
    pub vf: Option<u32>,
}

/// One emulated function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    /// Its PF/VF position.
    pub key: FnKey,
    /// Host-side BDF.
    pub pci_bdf: String,
    /// vHCA id.
    pub vhca_id: u32,
    /// Stable VUID.
    pub vuid: String,
}

impl Function {
    /// The list entry (without `ctrl_id` and `vfs`).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "hotplugged": false,
            "emulation_type": "NVME",
            "pf_index": self.key.pf,
            "pci_bdf": self.pci_bdf,
            "vhca_id": self.vhca_id,
            "vuid": self.vuid,
        });
        if let Some(vf) = self.key.vf {
            v["vf_index"] = json!(vf);
        }
        v
    }
}

/// Errors in the function table's shape.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    /// More PFs than the hardware has.
    #[error("{0} PFs requested; a BlueField-3 offers at most {MAX_PFS} static NVMe PFs")]
    TooManyPfs(u32),
    /// More VFs than a PF has.
    #[error("{0} VFs per PF requested; at most {MAX_VFS_PER_PF}")]
    TooManyVfs(u32),
    /// The serial is not usable in a VUID.
    #[error("device serial {0:?} must be 1-16 characters of A-Z 0-9")]
    BadSerial(String),
}

/// Builds the table of a BlueField-3 with `pfs` static PFs and `vfs` VFs on each, numbered as
/// the device numbers them: PF BDFs `<bus>:00.2`, `.3`...; VFs from device `0c` on each PF's
/// range; VUIDs `<serial>NVMES<pf>D0F<fn>` and `...VF<n>`.
pub fn bluefield3(pfs: u32, vfs: u32, serial: &str) -> Result<Vec<Function>, TableError> {
    if pfs > MAX_PFS {
        return Err(TableError::TooManyPfs(pfs));
    }
    if vfs > MAX_VFS_PER_PF {
        return Err(TableError::TooManyVfs(vfs));
    }
    if serial.is_empty()
        || serial.len() > 16
        || !serial
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
    {
        return Err(TableError::BadSerial(serial.to_string()));
    }
    let mut out = vec![];
    for pf in 0..pfs {
        let bus = 0x26 + pf * 0x10;
        let pf_vuid = format!("{serial}NVMES{pf}D0F{}", 2 + pf);
        out.push(Function {
            key: FnKey { pf, vf: None },
            pci_bdf: format!("{bus:02x}:00.{}", 2 + (pf % 6)),
            vhca_id: 2 + pf,
            vuid: pf_vuid.clone(),
        });
        for vf in 0..vfs {
            let slot = 0x0c + vf / 8;
            out.push(Function {
                key: FnKey { pf, vf: Some(vf) },
                pci_bdf: format!("{bus:02x}:{slot:02x}.{}", vf % 8),
                vhca_id: 98 + pf * MAX_VFS_PER_PF + vf,
                vuid: format!("{pf_vuid}VF{}", vf + 1),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn identities_are_unique_and_limits_hold() {
        let t = bluefield3(4, 127, "MT2328XZ17DF").unwrap();
        assert_eq!(t.len(), 4 * 128);
        let bdfs: HashSet<_> = t.iter().map(|f| &f.pci_bdf).collect();
        let vuids: HashSet<_> = t.iter().map(|f| &f.vuid).collect();
        let vhcas: HashSet<_> = t.iter().map(|f| f.vhca_id).collect();
        assert_eq!(
            (bdfs.len(), vuids.len(), vhcas.len()),
            (t.len(), t.len(), t.len())
        );
        assert_eq!(
            bluefield3(5, 0, "X").unwrap_err(),
            TableError::TooManyPfs(5)
        );
        assert_eq!(
            bluefield3(1, 128, "X").unwrap_err(),
            TableError::TooManyVfs(128)
        );
        assert!(bluefield3(1, 1, "bad serial").is_err());
        let first = &bluefield3(1, 2, "MT2328XZ17DF").unwrap();
        assert_eq!(first[0].pci_bdf, "26:00.2");
        assert_eq!(first[0].vuid, "MT2328XZ17DFNVMES0D0F2");
        assert_eq!(first[1].pci_bdf, "26:0c.0");
        assert_eq!(first[2].vuid, "MT2328XZ17DFNVMES0D0F2VF2");
    }
}
