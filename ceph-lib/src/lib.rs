//! librados and librbd, loaded at run time: the libraries SNAP itself uses (Debian's `librados2`
//! and `librbd1`, installed with `ceph-common`). Loading them with `dlopen` instead of linking
//! means the emulator builds without Ceph's development headers and runs without Ceph in
//! simulation mode; only real-Ceph mode needs them.
//!
//! Two users: the SNAP emulator opens images as SPDK's rbd bdev does ([`OpenImage`]), and the
//! ceph-agent creates, renames, lists and reads images, writes its index's omap keys and asks
//! the monitors for the cluster's status ([`Pool`], [`Rados::mon_command`]) without a CLI
//! process per call. [`Pool::lock_exclusive`] (a `cls_lock` lock that expires on the OSD) is
//! the first piece of controller replicas coordinating through RADOS (issue 24).
//!
//! This crate is the workspace's only `unsafe` code: the foreign calls, each on pointers this
//! crate created and owns ([`Rados`] shuts its handle down when dropped, [`Pool`] its I/O
//! context; image handles and write operations never leave the function that made them). The
//! signatures are the C API of `include/rados/librados.h` and `include/rbd/librbd.h`.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use libloading::Library;

type RadosT = *mut c_void;
type IoctxT = *mut c_void;
type ImageT = *mut c_void;
type ImageOptionsT = *mut c_void;
type WriteOpT = *mut c_void;
type ReadOpT = *mut c_void;
type OmapIterT = *mut c_void;

/// `LIBRADOS_CMPXATTR_OP_EQ` (librados.h).
const CMP_EQ: u8 = 1;
/// ECANCELED: a guarded write whose comparison failed.
const ECANCELED: c_int = 125;
/// ERANGE: a listing's buffer was too small (its lengths now say how much is needed).
const ERANGE: isize = 34;

/// `rbd_image_spec_t`: one entry of `rbd_list2`.
#[repr(C)]
struct ImageSpecT {
    id: *mut c_char,
    name: *mut c_char,
}

/// `rbd_snap_info_t`.
#[repr(C)]
struct SnapInfoT {
    id: u64,
    size: u64,
    name: *const c_char,
}

/// `rbd_linked_image_spec_t`.
#[repr(C)]
struct LinkedImageSpecT {
    pool_id: i64,
    pool_name: *mut c_char,
    pool_namespace: *mut c_char,
    image_id: *mut c_char,
    image_name: *mut c_char,
    trash: bool,
}

/// `struct timeval` on the 64-bit Linux targets this runs on.
#[repr(C)]
struct Timeval {
    tv_sec: i64,
    tv_usec: i64,
}

impl Timeval {
    fn of(d: std::time::Duration) -> Self {
        Self {
            tv_sec: d.as_secs() as i64,
            tv_usec: i64::from(d.subsec_micros()),
        }
    }
}

/// `LIBRADOS_LOCK_FLAG_MAY_RENEW` (librados.h): take the lock, or renew it when this client
/// and cookie hold it already.
const LOCK_FLAG_MAY_RENEW: u8 = 1;

/// `RBD_IMAGE_OPTION_FORMAT` and `RBD_IMAGE_OPTION_FEATURES` (librbd.h, "image options").
const OPTION_FORMAT: c_int = 0;
const OPTION_FEATURES: c_int = 1;
/// `RBD_IMAGE_OPTION_CLONE_FORMAT` (librbd.h, "image options").
const OPTION_CLONE_FORMAT: c_int = 12;

/// Errors of this module: a message, or a negative errno from the library.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LibError {
    /// The libraries could not be loaded.
    #[error("cannot load librados/librbd: {0}")]
    Load(String),
    /// A string with a NUL byte.
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    /// A call failed.
    #[error("{call} failed: errno {errno}")]
    Call {
        /// The C function.
        call: &'static str,
        /// Its (positive) errno.
        errno: i32,
    },
}

/// `struct timespec` of 64-bit Linux (`time_t` and `long` are 64 bits).
#[repr(C)]
#[derive(Default)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

struct Api {
    _rados: Library,
    _rbd: Library,
    create: unsafe extern "C" fn(*mut RadosT, *const c_char) -> c_int,
    conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    connect: unsafe extern "C" fn(RadosT) -> c_int,
    shutdown: unsafe extern "C" fn(RadosT),
    ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut IoctxT) -> c_int,
    ioctx_destroy: unsafe extern "C" fn(IoctxT),
    open: unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    resize: unsafe extern "C" fn(ImageT, u64) -> c_int,
    update_watch:
        unsafe extern "C" fn(ImageT, *mut u64, extern "C" fn(*mut c_void), *mut c_void) -> c_int,
    update_unwatch: unsafe extern "C" fn(ImageT, u64) -> c_int,
    flush: unsafe extern "C" fn(ImageT) -> c_int,
    read: unsafe extern "C" fn(ImageT, u64, usize, *mut c_char) -> isize,
    write: unsafe extern "C" fn(ImageT, u64, usize, *const c_char) -> isize,
    get_size: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    close: unsafe extern "C" fn(ImageT) -> c_int,
    options_create: unsafe extern "C" fn(*mut ImageOptionsT),
    options_destroy: unsafe extern "C" fn(ImageOptionsT),
    options_set_uint64: unsafe extern "C" fn(ImageOptionsT, c_int, u64) -> c_int,
    create4: unsafe extern "C" fn(IoctxT, *const c_char, u64, ImageOptionsT) -> c_int,
    clone3: unsafe extern "C" fn(
        IoctxT,
        *const c_char,
        *const c_char,
        IoctxT,
        *const c_char,
        ImageOptionsT,
    ) -> c_int,
    rename: unsafe extern "C" fn(IoctxT, *const c_char, *const c_char) -> c_int,
    metadata_set: unsafe extern "C" fn(ImageT, *const c_char, *const c_char) -> c_int,
    list2: unsafe extern "C" fn(IoctxT, *mut ImageSpecT, *mut usize) -> c_int,
    open_read_only:
        unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    get_features: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    get_create_timestamp: unsafe extern "C" fn(ImageT, *mut Timespec) -> c_int,
    #[allow(clippy::type_complexity)]
    get_parent_info2: unsafe extern "C" fn(
        ImageT,
        *mut c_char,
        usize,
        *mut c_char,
        usize,
        *mut c_char,
        usize,
        *mut c_char,
        usize,
    ) -> c_int,
    metadata_list: unsafe extern "C" fn(
        ImageT,
        *const c_char,
        u64,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
    ) -> c_int,
    spec_list_cleanup: unsafe extern "C" fn(*mut ImageSpecT, usize),
    snap_list: unsafe extern "C" fn(ImageT, *mut SnapInfoT, *mut c_int) -> c_int,
    snap_list_end: unsafe extern "C" fn(*mut SnapInfoT),
    snap_create: unsafe extern "C" fn(ImageT, *const c_char) -> c_int,
    snap_remove: unsafe extern "C" fn(ImageT, *const c_char) -> c_int,
    list_children3: unsafe extern "C" fn(ImageT, *mut LinkedImageSpecT, *mut usize) -> c_int,
    linked_list_cleanup: unsafe extern "C" fn(*mut LinkedImageSpecT, usize),
    mon_command: unsafe extern "C" fn(
        RadosT,
        *const *const c_char,
        usize,
        *const c_char,
        usize,
        *mut *mut c_char,
        *mut usize,
        *mut *mut c_char,
        *mut usize,
    ) -> c_int,
    buffer_free: unsafe extern "C" fn(*mut c_char),
    lock_exclusive: unsafe extern "C" fn(
        IoctxT,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
        *mut Timeval,
        u8,
    ) -> c_int,
    unlock: unsafe extern "C" fn(IoctxT, *const c_char, *const c_char, *const c_char) -> c_int,
    lock_shared: unsafe extern "C" fn(
        IoctxT,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
        *mut Timeval,
        u8,
    ) -> c_int,
    list_lockers: unsafe extern "C" fn(
        IoctxT,
        *const c_char,
        *const c_char,
        *mut c_int,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
        *mut c_char,
        *mut usize,
    ) -> isize,
    create_read_op: unsafe extern "C" fn() -> ReadOpT,
    release_read_op: unsafe extern "C" fn(ReadOpT),
    read_op_omap_get_vals2: unsafe extern "C" fn(
        ReadOpT,
        *const c_char,
        *const c_char,
        u64,
        *mut OmapIterT,
        *mut u8,
        *mut c_int,
    ),
    read_op_operate: unsafe extern "C" fn(ReadOpT, IoctxT, *const c_char, c_int) -> c_int,
    omap_get_next2: unsafe extern "C" fn(
        OmapIterT,
        *mut *mut c_char,
        *mut *mut c_char,
        *mut usize,
        *mut usize,
    ) -> c_int,
    omap_get_end: unsafe extern "C" fn(OmapIterT),
    write_op_omap_cmp:
        unsafe extern "C" fn(WriteOpT, *const c_char, u8, *const c_char, usize, *mut c_int),
    create_write_op: unsafe extern "C" fn() -> WriteOpT,
    release_write_op: unsafe extern "C" fn(WriteOpT),
    write_op_omap_set: unsafe extern "C" fn(
        WriteOpT,
        *const *const c_char,
        *const *const c_char,
        *const usize,
        usize,
    ),
    write_op_omap_rm_keys: unsafe extern "C" fn(WriteOpT, *const *const c_char, usize),
    write_op_operate:
        unsafe extern "C" fn(WriteOpT, IoctxT, *const c_char, *mut libc_time_t, c_int) -> c_int,
}

/// `time_t` on the 64-bit Linux targets this runs on.
#[allow(non_camel_case_types)]
type libc_time_t = i64;

fn api() -> Result<&'static Api, LibError> {
    static API: OnceLock<Result<Api, LibError>> = OnceLock::new();
    API.get_or_init(|| {
        let load = |name: &str| {
            // SAFETY: loading Ceph's libraries runs their initialisers, which only set up
            // library-internal state.
            unsafe { Library::new(name) }.map_err(|e| LibError::Load(e.to_string()))
        };
        let rados = load("librados.so.2")?;
        let rbd = load("librbd.so.1")?;
        macro_rules! sym {
            ($lib:expr, $name:literal) => {
                // SAFETY: the symbol has the C signature declared in `Api` (librados.h/librbd.h).
                *unsafe { $lib.get($name) }.map_err(|e| LibError::Load(e.to_string()))?
            };
        }
        Ok(Api {
            create: sym!(rados, b"rados_create\0"),
            conf_read_file: sym!(rados, b"rados_conf_read_file\0"),
            conf_set: sym!(rados, b"rados_conf_set\0"),
            connect: sym!(rados, b"rados_connect\0"),
            shutdown: sym!(rados, b"rados_shutdown\0"),
            ioctx_create: sym!(rados, b"rados_ioctx_create\0"),
            ioctx_destroy: sym!(rados, b"rados_ioctx_destroy\0"),
            open: sym!(rbd, b"rbd_open\0"),
            resize: sym!(rbd, b"rbd_resize\0"),
            update_watch: sym!(rbd, b"rbd_update_watch\0"),
            update_unwatch: sym!(rbd, b"rbd_update_unwatch\0"),
            flush: sym!(rbd, b"rbd_flush\0"),
            read: sym!(rbd, b"rbd_read\0"),
            write: sym!(rbd, b"rbd_write\0"),
            get_size: sym!(rbd, b"rbd_get_size\0"),
            close: sym!(rbd, b"rbd_close\0"),
            options_create: sym!(rbd, b"rbd_image_options_create\0"),
            options_destroy: sym!(rbd, b"rbd_image_options_destroy\0"),
            options_set_uint64: sym!(rbd, b"rbd_image_options_set_uint64\0"),
            create4: sym!(rbd, b"rbd_create4\0"),
            clone3: sym!(rbd, b"rbd_clone3\0"),
            rename: sym!(rbd, b"rbd_rename\0"),
            metadata_set: sym!(rbd, b"rbd_metadata_set\0"),
            list2: sym!(rbd, b"rbd_list2\0"),
            open_read_only: sym!(rbd, b"rbd_open_read_only\0"),
            get_features: sym!(rbd, b"rbd_get_features\0"),
            get_create_timestamp: sym!(rbd, b"rbd_get_create_timestamp\0"),
            get_parent_info2: sym!(rbd, b"rbd_get_parent_info2\0"),
            metadata_list: sym!(rbd, b"rbd_metadata_list\0"),
            spec_list_cleanup: sym!(rbd, b"rbd_image_spec_list_cleanup\0"),
            snap_list: sym!(rbd, b"rbd_snap_list\0"),
            snap_list_end: sym!(rbd, b"rbd_snap_list_end\0"),
            snap_create: sym!(rbd, b"rbd_snap_create\0"),
            snap_remove: sym!(rbd, b"rbd_snap_remove\0"),
            list_children3: sym!(rbd, b"rbd_list_children3\0"),
            linked_list_cleanup: sym!(rbd, b"rbd_linked_image_spec_list_cleanup\0"),
            mon_command: sym!(rados, b"rados_mon_command\0"),
            buffer_free: sym!(rados, b"rados_buffer_free\0"),
            lock_exclusive: sym!(rados, b"rados_lock_exclusive\0"),
            unlock: sym!(rados, b"rados_unlock\0"),
            lock_shared: sym!(rados, b"rados_lock_shared\0"),
            list_lockers: sym!(rados, b"rados_list_lockers\0"),
            create_read_op: sym!(rados, b"rados_create_read_op\0"),
            release_read_op: sym!(rados, b"rados_release_read_op\0"),
            read_op_omap_get_vals2: sym!(rados, b"rados_read_op_omap_get_vals2\0"),
            read_op_operate: sym!(rados, b"rados_read_op_operate\0"),
            omap_get_next2: sym!(rados, b"rados_omap_get_next2\0"),
            omap_get_end: sym!(rados, b"rados_omap_get_end\0"),
            write_op_omap_cmp: sym!(rados, b"rados_write_op_omap_cmp\0"),
            create_write_op: sym!(rados, b"rados_create_write_op\0"),
            release_write_op: sym!(rados, b"rados_release_write_op\0"),
            write_op_omap_set: sym!(rados, b"rados_write_op_omap_set\0"),
            write_op_omap_rm_keys: sym!(rados, b"rados_write_op_omap_rm_keys\0"),
            write_op_operate: sym!(rados, b"rados_write_op_operate\0"),
            _rados: rados,
            _rbd: rbd,
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// A list as librados and librbd return them: NUL-terminated strings back to back (an entry
/// may be empty; nothing after the last NUL counts).
fn nul_list(b: &[u8]) -> Vec<String> {
    match b.iter().rposition(|c| *c == 0) {
        Some(end) => b[..end]
            .split(|c| *c == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
        None => vec![],
    }
}

fn cstr(what: &'static str, s: &str) -> Result<CString, LibError> {
    CString::new(s).map_err(|_| LibError::Nul(what))
}

fn check(call: &'static str, r: c_int) -> Result<(), LibError> {
    if r < 0 {
        Err(LibError::Call { call, errno: -r })
    } else {
        Ok(())
    }
}

impl ConnectSpec {
    /// As a `ceph` command line with `--id`, `--conf` and `--keyring` would connect.
    pub fn with_files(
        user_id: &str,
        config_file: &std::path::Path,
        key_file: &std::path::Path,
    ) -> Self {
        Self {
            user_id: Some(user_id.to_string()),
            config_file: Some(config_file.to_string_lossy().into_owned()),
            key_file: Some(key_file.to_string_lossy().into_owned()),
            options: vec![],
        }
    }
}

/// How to connect: what `bdev_rbd_register_cluster` (or an inline `bdev_rbd_create`) gives.
#[derive(Debug, Clone, Default)]
pub struct ConnectSpec {
    /// cephx user without `client.`; `admin` when absent (as SPDK does).
    pub user_id: Option<String>,
    /// A config file to read first.
    pub config_file: Option<String>,
    /// A keyring file.
    pub key_file: Option<String>,
    /// Options set after the file (`mon_host`, `key`, ...), in order.
    pub options: Vec<(String, String)>,
}

/// A connected cluster handle (`rados_t`); shut down when the last reference goes.
#[derive(Debug)]
pub struct Rados {
    handle: RadosT,
}

// SAFETY: a `rados_t` may be used from any thread (librados is thread-safe; SPDK shares one
// handle between its reactor threads the same way).
unsafe impl Send for Rados {}
// SAFETY: as above.
unsafe impl Sync for Rados {}

impl Drop for Rados {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: `handle` came from `rados_create` and is shut down exactly once, here.
            unsafe { (api.shutdown)(self.handle) }
        }
    }
}

impl Rados {
    /// Creates a handle, configures it as SPDK's `bdev_rbd_register_cluster` does (file, then
    /// options) and connects. Blocking: at most `client_mount_timeout`.
    pub fn connect(spec: &ConnectSpec, timeout_secs: u64) -> Result<Arc<Self>, LibError> {
        let api = api()?;
        let id = cstr("user_id", spec.user_id.as_deref().unwrap_or("admin"))?;
        let mut handle: RadosT = std::ptr::null_mut();
        // SAFETY: `handle` is a valid out-pointer; `id` outlives the call.
        check("rados_create", unsafe {
            (api.create)(&mut handle, id.as_ptr())
        })?;
        // From here on, dropping `me` shuts the handle down.
        let me = Self { handle };
        let set = |k: &str, v: &str| -> Result<(), LibError> {
            let (k, v) = (cstr("option", k)?, cstr("value", v)?);
            // SAFETY: a live handle and NUL-terminated strings that outlive the call.
            check("rados_conf_set", unsafe {
                (api.conf_set)(me.handle, k.as_ptr(), v.as_ptr())
            })
        };
        // As SPDK v24.01's `rbd_register_cluster` (module/bdev/rbd/bdev_rbd.c): the config file
        // (without one, the default locations, whose absence is no error), then the
        // `config_param` options in order, then `keyring` from the key file.
        let file = spec
            .config_file
            .as_deref()
            .map(|f| cstr("config_file", f))
            .transpose()?;
        // SAFETY: a live handle and a NUL-terminated path (or null) that outlives the call.
        let read = unsafe {
            (api.conf_read_file)(
                me.handle,
                file.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            )
        };
        if file.is_some() {
            check("rados_conf_read_file", read)?;
        }
        // No admin socket and no log file (unless the options ask for them): one emulator per
        // simulated DPU must not collide on either.
        set("admin_socket", "")?;
        set("log_file", "")?;
        for (k, v) in &spec.options {
            set(k, v)?;
        }
        if let Some(k) = &spec.key_file {
            set("keyring", k)?;
        }
        let secs = timeout_secs.max(1).to_string();
        for k in [
            "client_mount_timeout",
            "rados_mon_op_timeout",
            "rados_osd_op_timeout",
        ] {
            set(k, &secs)?;
        }
        // SAFETY: a configured, live handle.
        check("rados_connect", unsafe { (api.connect)(me.handle) })?;
        Ok(Arc::new(me))
    }
}

/// The bit of each RBD feature unistor lets a manifest name (librbd's `features.h`).
pub fn feature_bit(name: &str) -> Option<u64> {
    Some(match name {
        "layering" => 1 << 0,
        "exclusive-lock" => 1 << 2,
        "object-map" => 1 << 3,
        "fast-diff" => 1 << 4,
        "deep-flatten" => 1 << 5,
        _ => return None,
    })
}

/// The names of the feature bits set in `bits`, in bit order, as `rbd info` prints them
/// (librbd's `features.h` and `RBD_FEATURE_NAME_*`); unknown bits are left out.
pub fn feature_names(bits: u64) -> Vec<&'static str> {
    const NAMES: [&str; 12] = [
        "layering",
        "striping",
        "exclusive-lock",
        "object-map",
        "fast-diff",
        "deep-flatten",
        "journaling",
        "data-pool",
        "operations",
        "migrating",
        "non-primary",
        "dirty-cache",
    ];
    (0..NAMES.len())
        .filter(|b| bits & (1 << b) != 0)
        .map(|b| NAMES[b])
        .collect()
}

/// What a read of an image gives: size, feature bits and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    /// Bytes.
    pub size: u64,
    /// `RBD_FEATURE_*` bits.
    pub features: u64,
    /// Its `rbd image-meta` keys.
    pub metadata: std::collections::BTreeMap<String, String>,
    /// The snapshot it is a clone of, `pool/image@snapshot` (None: not a clone, or flattened).
    pub parent: Option<String>,
    /// Its snapshots (user snapshots: not those librbd keeps in its trash for clones), in the
    /// order librbd lists them, with their ids (rising: the cluster assigns them).
    pub snapshots: Vec<(u64, String)>,
}

/// A pool's I/O context (`rados_ioctx_t`) on a connected cluster, for the calls an
/// administrator's `rbd` and `rados` commands make: create, rename and list images, set their
/// metadata, and set or remove an object's omap keys. Each call blocks (at most librados' op
/// timeouts, set at [`Rados::connect`]).
#[derive(Debug)]
pub struct Pool {
    /// Keeps the cluster connected while the context exists.
    _rados: Arc<Rados>,
    io: IoctxT,
    /// The pool's name.
    name: String,
}

// SAFETY: librados I/O contexts may be shared between threads as long as their own state
// (namespace, snapshot context) is not changed, which this type never does.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: `io` came from `rados_ioctx_create` and is destroyed exactly once, here.
            unsafe { (api.ioctx_destroy)(self.io) }
        }
    }
}

impl Rados {
    /// Sends `command` (the JSON a `ceph` command line becomes, e.g.
    /// `{"prefix": "status", "format": "json"}`) to a monitor and returns its output
    /// (`rados_mon_command`); a refusal is its errno.
    pub fn mon_command(&self, command: &str) -> Result<Vec<u8>, LibError> {
        let api = api()?;
        let cmd = cstr("mon command", command)?;
        let cmds = [cmd.as_ptr()];
        let (mut out, mut out_len) = (std::ptr::null_mut::<c_char>(), 0usize);
        let (mut status, mut status_len) = (std::ptr::null_mut::<c_char>(), 0usize);
        // SAFETY: a connected handle; one command string and no input; the out-pointers are
        // valid and the buffers librados allocates in them are freed below, once.
        let r = unsafe {
            (api.mon_command)(
                self.handle,
                cmds.as_ptr(),
                1,
                std::ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut status,
                &mut status_len,
            )
        };
        let output = if out.is_null() {
            vec![]
        } else {
            // SAFETY: librados set `out` to `out_len` bytes it allocated.
            unsafe { std::slice::from_raw_parts(out.cast::<u8>(), out_len) }.to_vec()
        };
        // SAFETY: each buffer came from librados (or is null, which it accepts), freed once.
        unsafe {
            (api.buffer_free)(out);
            (api.buffer_free)(status);
        }
        check("rados_mon_command", r)?;
        Ok(output)
    }

    /// An I/O context on `pool` (ENOENT when there is no such pool).
    pub fn pool(self: &Arc<Self>, pool: &str) -> Result<Pool, LibError> {
        let api = api()?;
        let name = cstr("pool_name", pool)?;
        let mut io: IoctxT = std::ptr::null_mut();
        // SAFETY: a connected handle, a valid out-pointer and a string outliving the call.
        check("rados_ioctx_create", unsafe {
            (api.ioctx_create)(self.handle, name.as_ptr(), &mut io)
        })?;
        Ok(Pool {
            _rados: self.clone(),
            io,
            name: pool.to_string(),
        })
    }
}

/// Runs `call` with librbd image options holding `values` (each an `RBD_IMAGE_OPTION_*` and
/// its number), destroyed after; the first failure to set one is returned instead.
fn with_image_options(
    api: &Api,
    values: &[(c_int, u64)],
    call: impl FnOnce(ImageOptionsT) -> c_int,
) -> c_int {
    let mut opts: ImageOptionsT = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; the options are destroyed below, once.
    unsafe { (api.options_create)(&mut opts) };
    let mut r = 0;
    for (option, value) in values {
        // SAFETY: `opts` is live until destroyed below.
        r = unsafe { (api.options_set_uint64)(opts, *option, *value) };
        if r < 0 {
            break;
        }
    }
    if r >= 0 {
        r = call(opts);
    }
    // SAFETY: created above, destroyed once, after its last use.
    unsafe { (api.options_destroy)(opts) };
    r
}

impl Pool {
    /// Creates a format-2 image of `size` bytes with exactly the `features` bits (`rbd_create4`);
    /// EEXIST when the name is taken.
    pub fn create_image(&self, name: &str, size: u64, features: u64) -> Result<(), LibError> {
        let api = api()?;
        let name = cstr("image name", name)?;
        let r = with_image_options(
            api,
            &[(OPTION_FORMAT, 2), (OPTION_FEATURES, features)],
            |opts| {
                // SAFETY: `opts` is live for the call; `io` lives as long as `self`.
                unsafe { (api.create4)(self.io, name.as_ptr(), size, opts) }
            },
        );
        check("rbd_create4", r)
    }

    /// Clones snapshot `snap` of image `parent` of this pool as image `child` of this pool
    /// (`rbd_clone3`, clone format 2: the snapshot needs no protection) with exactly the
    /// `features` bits; EEXIST when `child` is taken, ENOENT when the snapshot is missing.
    pub fn clone_image(
        &self,
        parent: &str,
        snap: &str,
        child: &str,
        features: u64,
    ) -> Result<(), LibError> {
        let api = api()?;
        let (parent, snap, child) = (
            cstr("image name", parent)?,
            cstr("snapshot name", snap)?,
            cstr("image name", child)?,
        );
        let options = [(OPTION_CLONE_FORMAT, 2), (OPTION_FEATURES, features)];
        let r = with_image_options(api, &options, |opts| {
            // SAFETY: `opts` is live for the call; `io` lives as long as `self` and is both the
            // parent's and the child's pool.
            unsafe {
                (api.clone3)(
                    self.io,
                    parent.as_ptr(),
                    snap.as_ptr(),
                    self.io,
                    child.as_ptr(),
                    opts,
                )
            }
        });
        check("rbd_clone3", r)
    }

    /// The size of snapshot `snap` of image `name`; None when the image or the snapshot is
    /// missing.
    pub fn snapshot_size(&self, name: &str, snap: &str) -> Result<Option<u64>, LibError> {
        let api = api()?;
        let (name, snap) = (cstr("image name", name)?, cstr("snapshot name", snap)?);
        self.read_only(api, &name, Some(&snap), |img| {
            let mut size = 0u64;
            // SAFETY: `img` is open; a valid out-pointer.
            check("rbd_get_size", unsafe { (api.get_size)(img, &mut size) })?;
            Ok(size)
        })
    }

    /// When image `name` was created, in seconds since the Unix epoch, by the clock of the
    /// client that created it (`rbd_get_create_timestamp`); None when it is missing.
    pub fn created_at(&self, name: &str) -> Result<Option<i64>, LibError> {
        let api = api()?;
        let name = cstr("image name", name)?;
        self.read_only(api, &name, None, |img| {
            let mut at = Timespec::default();
            // SAFETY: `img` is open; a valid out-pointer to a `struct timespec`.
            check("rbd_get_create_timestamp", unsafe {
                (api.get_create_timestamp)(img, &mut at)
            })?;
            Ok(at.tv_sec)
        })
    }

    /// Runs `f` on image `name` (at snapshot `snap`, else its head) opened read-only, which
    /// registers no watch, and closes it after; None when the image or the snapshot is missing.
    fn read_only<T>(
        &self,
        api: &Api,
        name: &std::ffi::CStr,
        snap: Option<&std::ffi::CStr>,
        f: impl FnOnce(ImageT) -> Result<T, LibError>,
    ) -> Result<Option<T>, LibError> {
        let mut img: ImageT = std::ptr::null_mut();
        let snap = snap.map_or(std::ptr::null(), std::ffi::CStr::as_ptr);
        // SAFETY: `io` is live; the names are NUL-terminated (a null snapshot: the head).
        let r = unsafe { (api.open_read_only)(self.io, name.as_ptr(), &mut img, snap) };
        if r == -2 {
            return Ok(None);
        }
        check("rbd_open_read_only", r)?;
        let out = f(img);
        // SAFETY: closes the image opened above, once, after its last use.
        unsafe { (api.close)(img) };
        out.map(Some)
    }

    /// Grows image `name` to `size` bytes (`rbd_resize`, through one open of the image).
    pub fn resize_image(&self, name: &str, size: u64) -> Result<(), LibError> {
        let api = api()?;
        let name = cstr("image name", name)?;
        let mut img: ImageT = std::ptr::null_mut();
        // SAFETY: `io` is live; a null snapshot name means the head.
        check("rbd_open", unsafe {
            (api.open)(self.io, name.as_ptr(), &mut img, std::ptr::null())
        })?;
        // SAFETY: `img` is open.
        let r = unsafe { (api.resize)(img, size) };
        // SAFETY: closes the image opened above, once.
        unsafe { (api.close)(img) };
        check("rbd_resize", r)
    }

    /// Sets `keys` on image `name` (`rbd_metadata_set`, through one open of the image).
    pub fn set_metadata(&self, name: &str, keys: &[(&str, &str)]) -> Result<(), LibError> {
        let api = api()?;
        let name = cstr("image name", name)?;
        let keys = keys
            .iter()
            .map(|(k, v)| Ok((cstr("metadata key", k)?, cstr("metadata value", v)?)))
            .collect::<Result<Vec<_>, LibError>>()?;
        let mut img: ImageT = std::ptr::null_mut();
        // SAFETY: `io` is live; a null snapshot name means the head.
        check("rbd_open", unsafe {
            (api.open)(self.io, name.as_ptr(), &mut img, std::ptr::null())
        })?;
        let mut r = 0;
        for (k, v) in &keys {
            // SAFETY: the image is open (closed below); the strings outlive the call.
            r = unsafe { (api.metadata_set)(img, k.as_ptr(), v.as_ptr()) };
            if r < 0 {
                break;
            }
        }
        // SAFETY: closes the image opened above, once.
        let closed = unsafe { (api.close)(img) };
        check("rbd_metadata_set", r)?;
        check("rbd_close", closed)
    }

    /// Renames image `from` to `to` (`rbd_rename`); EEXIST when `to` is taken, ENOENT when
    /// `from` is gone.
    pub fn rename_image(&self, from: &str, to: &str) -> Result<(), LibError> {
        let api = api()?;
        let (from, to) = (cstr("image name", from)?, cstr("image name", to)?);
        // SAFETY: `io` is live; both strings outlive the call.
        check("rbd_rename", unsafe {
            (api.rename)(self.io, from.as_ptr(), to.as_ptr())
        })
    }

    /// The names of the pool's images (`rbd_list2`, what `rbd ls` prints).
    pub fn image_names(&self) -> Result<Vec<String>, LibError> {
        let api = api()?;
        let mut room = 64usize;
        loop {
            let mut specs: Vec<ImageSpecT> = (0..room)
                .map(|_| ImageSpecT {
                    id: std::ptr::null_mut(),
                    name: std::ptr::null_mut(),
                })
                .collect();
            let mut size = room;
            // SAFETY: `specs` has room for `size` entries; librbd fills at most that many.
            let r = unsafe { (api.list2)(self.io, specs.as_mut_ptr(), &mut size) };
            if r as isize == -ERANGE && size > room {
                // ERANGE: `size` now says how many there are.
                room = size;
                continue;
            }
            check("rbd_list2", r)?;
            let names = specs[..size]
                .iter()
                .filter(|s| !s.name.is_null())
                // SAFETY: librbd set each name to a NUL-terminated string it allocated.
                .map(|s| unsafe { std::ffi::CStr::from_ptr(s.name) })
                .map(|n| n.to_string_lossy().into_owned())
                .collect();
            // SAFETY: frees the `size` entries librbd filled, once.
            unsafe { (api.spec_list_cleanup)(specs.as_mut_ptr(), size) };
            return Ok(names);
        }
    }

    /// Size, features and metadata of image `name`, through a read-only open (which registers
    /// no watch: a read is never seen as a client of the image); `None` when there is no such
    /// image.
    pub fn read_image(&self, name: &str) -> Result<Option<ImageFacts>, LibError> {
        let api = api()?;
        let name = cstr("image name", name)?;
        self.read_only(api, &name, None, |img| Self::facts(api, img))
    }

    fn facts(api: &Api, img: ImageT) -> Result<ImageFacts, LibError> {
        let (mut size, mut features) = (0u64, 0u64);
        // SAFETY: `img` is open (the caller closes it); valid out-pointers.
        check("rbd_get_size", unsafe { (api.get_size)(img, &mut size) })?;
        // SAFETY: as above.
        check("rbd_get_features", unsafe {
            (api.get_features)(img, &mut features)
        })?;
        let (mut keys_len, mut vals_len) = (4096usize, 4096usize);
        let metadata = loop {
            let mut keys = vec![0u8; keys_len];
            let mut vals = vec![0u8; vals_len];
            let empty = c"";
            // SAFETY: `img` is open; the buffers have the lengths passed; `max` 0 means all
            // keys, from the first (`start` "").
            let r = unsafe {
                (api.metadata_list)(
                    img,
                    empty.as_ptr(),
                    0,
                    keys.as_mut_ptr().cast(),
                    &mut keys_len,
                    vals.as_mut_ptr().cast(),
                    &mut vals_len,
                )
            };
            if r as isize == -ERANGE {
                // The lengths now say how much room the lists need.
                continue;
            }
            check("rbd_metadata_list", r)?;
            let (k, v) = (nul_list(&keys[..keys_len]), nul_list(&vals[..vals_len]));
            if k.len() != v.len() {
                return Err(LibError::Call {
                    call: "rbd_metadata_list",
                    errno: 5,
                });
            }
            break k.into_iter().zip(v).collect();
        };
        Ok(ImageFacts {
            size,
            features,
            metadata,
            parent: Self::parent(api, img)?,
            snapshots: Self::snapshots(api, img)?,
        })
    }

    /// The user snapshots of open image `img`: id and name.
    fn snapshots(api: &Api, img: ImageT) -> Result<Vec<(u64, String)>, LibError> {
        let mut room: c_int = 16;
        loop {
            let mut infos: Vec<SnapInfoT> = (0..room)
                .map(|_| SnapInfoT {
                    id: 0,
                    size: 0,
                    name: std::ptr::null(),
                })
                .collect();
            let mut max = room;
            // SAFETY: `img` is open; `infos` has room for `max` entries.
            let r = unsafe { (api.snap_list)(img, infos.as_mut_ptr(), &mut max) };
            if r as isize == -ERANGE {
                // `max` now says how many there are.
                room = max.max(room + 1);
                continue;
            }
            check("rbd_snap_list", r)?;
            let out = infos[..r as usize]
                .iter()
                .filter(|i| !i.name.is_null())
                // SAFETY: librbd set each name to a NUL-terminated string it allocated.
                .map(|i| (i.id, unsafe { std::ffi::CStr::from_ptr(i.name) }))
                .map(|(id, n)| (id, n.to_string_lossy().into_owned()))
                .collect();
            // SAFETY: frees the names librbd allocated in this list, once.
            unsafe { (api.snap_list_end)(infos.as_mut_ptr()) };
            return Ok(out);
        }
    }

    /// Takes snapshot `snap` of image `name` (`rbd_snap_create`). EEXIST when it exists.
    /// Crash-consistent: librbd quiesces the image's writers that registered for it (SPDK's
    /// rbd bdev does not) and orders the snapshot after every write the cluster acknowledged.
    pub fn create_snapshot(&self, name: &str, snap: &str) -> Result<(), LibError> {
        self.with_open(
            name,
            "rbd_snap_create",
            |api, img, s| {
                // SAFETY: `img` is open; `s` is NUL-terminated.
                unsafe { (api.snap_create)(img, s) }
            },
            snap,
        )
    }

    /// Removes snapshot `snap` of image `name` (`rbd_snap_remove`). ENOENT when it is missing.
    /// With clone format 2, a snapshot that has clones is moved to librbd's trash namespace
    /// rather than refused: callers check [`Pool::snapshot_children`] first.
    pub fn remove_snapshot(&self, name: &str, snap: &str) -> Result<(), LibError> {
        self.with_open(
            name,
            "rbd_snap_remove",
            |api, img, s| {
                // SAFETY: `img` is open; `s` is NUL-terminated.
                unsafe { (api.snap_remove)(img, s) }
            },
            snap,
        )
    }

    /// Opens image `name` read-write, calls `f` with `arg` as a C string, closes it.
    fn with_open(
        &self,
        name: &str,
        call: &'static str,
        f: impl FnOnce(&Api, ImageT, *const c_char) -> c_int,
        arg: &str,
    ) -> Result<(), LibError> {
        let api = api()?;
        let (name, arg) = (cstr("image name", name)?, cstr("snapshot name", arg)?);
        let mut img: ImageT = std::ptr::null_mut();
        // SAFETY: `io` is live; a null snapshot name means the head.
        check("rbd_open", unsafe {
            (api.open)(self.io, name.as_ptr(), &mut img, std::ptr::null())
        })?;
        let r = f(api, img, arg.as_ptr());
        // SAFETY: closes the image opened above, once.
        let closed = unsafe { (api.close)(img) };
        check(call, r)?;
        check("rbd_close", closed)
    }

    /// The clones of snapshot `snap` of image `name`, `pool/image` each (those in librbd's
    /// trash too, marked ` (trashed)`); None when the image or the snapshot is missing.
    pub fn snapshot_children(
        &self,
        name: &str,
        snap: &str,
    ) -> Result<Option<Vec<String>>, LibError> {
        let api = api()?;
        let (name, snap) = (cstr("image name", name)?, cstr("snapshot name", snap)?);
        self.read_only(api, &name, Some(&snap), |img| {
            let mut room = 16usize;
            loop {
                let mut specs: Vec<LinkedImageSpecT> = (0..room)
                    .map(|_| LinkedImageSpecT {
                        pool_id: 0,
                        pool_name: std::ptr::null_mut(),
                        pool_namespace: std::ptr::null_mut(),
                        image_id: std::ptr::null_mut(),
                        image_name: std::ptr::null_mut(),
                        trash: false,
                    })
                    .collect();
                let mut size = room;
                // SAFETY: `img` is open at the snapshot; `specs` has room for `size` entries.
                let r = unsafe { (api.list_children3)(img, specs.as_mut_ptr(), &mut size) };
                if r as isize == -ERANGE && size > room {
                    room = size;
                    continue;
                }
                check("rbd_list_children3", r)?;
                let text = |p: *mut c_char| {
                    if p.is_null() {
                        String::new()
                    } else {
                        // SAFETY: librbd set it to a NUL-terminated string it allocated.
                        unsafe { std::ffi::CStr::from_ptr(p) }
                            .to_string_lossy()
                            .into_owned()
                    }
                };
                let out = specs[..size]
                    .iter()
                    .map(|s| {
                        let name = format!("{}/{}", text(s.pool_name), text(s.image_name));
                        if s.trash {
                            format!("{name} (trashed)")
                        } else {
                            name
                        }
                    })
                    .collect();
                // SAFETY: frees the `size` entries librbd filled, once.
                unsafe { (api.linked_list_cleanup)(specs.as_mut_ptr(), size) };
                return Ok(out);
            }
        })
    }

    /// How many clone generations stand between snapshot `parent` (`pool/image@snapshot`, a
    /// clone's parent as [`ImageFacts::parent`] gives it) and an image that is no clone: 1 when
    /// the parent's image is no clone at that snapshot. Each ancestor is opened read-only at its
    /// snapshot (its parent there: a later flatten of its head does not change it); at most
    /// `limit` are followed (then `limit`). None when an ancestor is gone.
    pub fn clone_depth(&self, parent: &str, limit: u32) -> Result<Option<u32>, LibError> {
        let api = api()?;
        let mut next = parent.to_string();
        let mut depth = 1;
        while depth < limit {
            let Some((pool, rest)) = next.split_once('/') else {
                return Ok(None);
            };
            let Some((image, snap)) = rest.split_once('@') else {
                return Ok(None);
            };
            let (image, snap) = (cstr("image name", image)?, cstr("snapshot name", snap)?);
            // This pool's context when the ancestor is in it (the common case), else one for
            // the ancestor's pool, destroyed after the image is closed.
            let other;
            let io = if self.name == pool {
                self
            } else {
                other = self._rados.pool(pool)?;
                &other
            };
            let up = io.read_only(api, &image, Some(&snap), |img| Self::parent(api, img))?;
            match up {
                None => return Ok(None),
                Some(None) => return Ok(Some(depth)),
                Some(Some(p)) => {
                    next = p;
                    depth += 1;
                }
            }
        }
        Ok(Some(limit))
    }

    /// The parent snapshot of open image `img`, `pool/image@snapshot`; None without one.
    fn parent(api: &Api, img: ImageT) -> Result<Option<String>, LibError> {
        // Pool, image and snapshot names are at most 63 characters under unistor's allow-lists
        // and Ceph's own limits keep them far below 4 KiB.
        const LEN: usize = 4096;
        let (mut pool, mut name, mut id, mut snap) = (
            vec![0u8; LEN],
            vec![0u8; LEN],
            vec![0u8; LEN],
            vec![0u8; LEN],
        );
        // SAFETY: `img` is open (the caller closes it); each buffer is LEN bytes long, as
        // passed; librbd writes NUL-terminated names into them.
        let r = unsafe {
            (api.get_parent_info2)(
                img,
                pool.as_mut_ptr().cast(),
                LEN,
                name.as_mut_ptr().cast(),
                LEN,
                id.as_mut_ptr().cast(),
                LEN,
                snap.as_mut_ptr().cast(),
                LEN,
            )
        };
        if r == -2 {
            return Ok(None);
        }
        check("rbd_get_parent_info2", r)?;
        let text = |b: &[u8]| {
            let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
            String::from_utf8_lossy(&b[..end]).into_owned()
        };
        Ok(Some(format!(
            "{}/{}@{}",
            text(&pool),
            text(&name),
            text(&snap)
        )))
    }

    /// Takes (or renews) the exclusive `cls_lock` lock `name` on `object` for `duration`, as
    /// this connection with `cookie`: EBUSY while another client or cookie holds it. The lock
    /// expires on the OSD when it is not renewed in time (the holder's clock plays no part);
    /// `object` is created when missing.
    pub fn lock_exclusive(
        &self,
        object: &str,
        name: &str,
        cookie: &str,
        duration: std::time::Duration,
    ) -> Result<(), LibError> {
        self.lock(object, name, cookie, duration, false)
    }

    /// Takes (or renews) a share of lock `name` on `object` for `duration`, as this connection
    /// with `cookie`: many holders at once, each expiring on the OSD when not renewed — a
    /// membership list whose members leave by silence.
    pub fn lock_shared(
        &self,
        object: &str,
        name: &str,
        cookie: &str,
        duration: std::time::Duration,
    ) -> Result<(), LibError> {
        self.lock(object, name, cookie, duration, true)
    }

    fn lock(
        &self,
        object: &str,
        name: &str,
        cookie: &str,
        duration: std::time::Duration,
        shared: bool,
    ) -> Result<(), LibError> {
        let api = api()?;
        let (oid, name) = (cstr("object name", object)?, cstr("lock name", name)?);
        let (cookie, tag) = (cstr("lock cookie", cookie)?, cstr("lock tag", "unistor")?);
        let desc = cstr("lock description", "unistor")?;
        let mut tv = Timeval::of(duration);
        let (o, n, c, d) = (oid.as_ptr(), name.as_ptr(), cookie.as_ptr(), desc.as_ptr());
        let flags = LOCK_FLAG_MAY_RENEW;
        // SAFETY: `io` is live; the strings behind the pointers and `tv` outlive the call.
        let r = unsafe {
            match shared {
                true => (api.lock_shared)(self.io, o, n, c, tag.as_ptr(), d, &mut tv, flags),
                false => (api.lock_exclusive)(self.io, o, n, c, d, &mut tv, flags),
            }
        };
        check(
            if shared {
                "rados_lock_shared"
            } else {
                "rados_lock_exclusive"
            },
            r,
        )
    }

    /// The cookies of lock `name`'s live holders on `object` (expired holders are left out by
    /// the OSD); ENOENT when the object is missing.
    pub fn lockers(&self, object: &str, name: &str) -> Result<Vec<String>, LibError> {
        let api = api()?;
        let (oid, name) = (cstr("object name", object)?, cstr("lock name", name)?);
        let mut room = 1024usize;
        loop {
            let mut bufs = [
                vec![0u8; room],
                vec![0u8; room],
                vec![0u8; room],
                vec![0u8; room],
            ];
            let mut lens = [room; 4];
            let mut exclusive: c_int = 0;
            let [tag, clients, cookies, addrs] = &mut bufs;
            let [tag_len, clients_len, cookies_len, addrs_len] = &mut lens;
            // SAFETY: `io` is live; each buffer has the length passed with it.
            let r = unsafe {
                (api.list_lockers)(
                    self.io,
                    oid.as_ptr(),
                    name.as_ptr(),
                    &mut exclusive,
                    tag.as_mut_ptr().cast(),
                    tag_len,
                    clients.as_mut_ptr().cast(),
                    clients_len,
                    cookies.as_mut_ptr().cast(),
                    cookies_len,
                    addrs.as_mut_ptr().cast(),
                    addrs_len,
                )
            };
            if r == -ERANGE {
                // The lengths say how much room the lists need.
                room = lens.iter().copied().max().unwrap_or(room).max(room * 2);
                continue;
            }
            if r < 0 {
                return Err(LibError::Call {
                    call: "rados_list_lockers",
                    errno: -(r as i32),
                });
            }
            let mut cookies = nul_list(&bufs[2][..lens[2].min(room)]);
            cookies.truncate(r as usize);
            return Ok(cookies);
        }
    }

    /// Gives lock `name` on `object` up (ENOENT when this client and cookie do not hold it).
    pub fn unlock(&self, object: &str, name: &str, cookie: &str) -> Result<(), LibError> {
        let api = api()?;
        let (oid, name) = (cstr("object name", object)?, cstr("lock name", name)?);
        let cookie = cstr("lock cookie", cookie)?;
        // SAFETY: `io` is live; the strings outlive the call.
        check("rados_unlock", unsafe {
            (api.unlock)(self.io, oid.as_ptr(), name.as_ptr(), cookie.as_ptr())
        })
    }

    /// Sets omap key `key` of `object` to `value`, creating the object when missing (what
    /// `rados setomapval` does).
    pub fn omap_set(&self, object: &str, key: &str, value: &[u8]) -> Result<(), LibError> {
        let api = api()?;
        let key = cstr("omap key", key)?;
        let (keys, vals, lens) = (
            [key.as_ptr()],
            [value.as_ptr().cast::<c_char>()],
            [value.len()],
        );
        self.write_op(object, "rados_write_op_omap_set", |op| {
            // SAFETY: `op` is live; the arrays hold one entry each and outlive the operation.
            unsafe { (api.write_op_omap_set)(op, keys.as_ptr(), vals.as_ptr(), lens.as_ptr(), 1) }
        })
    }

    /// Every omap key of `object` with its value (ENOENT when the object is missing). Reads up
    /// to `max` keys; more is an error (EFBIG), not a silent truncation.
    pub fn omap_values(
        &self,
        object: &str,
        max: u64,
    ) -> Result<BTreeMap<String, Vec<u8>>, LibError> {
        let api = api()?;
        let oid = cstr("object name", object)?;
        let empty = c"";
        // SAFETY: returns a new operation (or null), released below, once.
        let op = unsafe { (api.create_read_op)() };
        if op.is_null() {
            return Err(LibError::Call {
                call: "rados_create_read_op",
                errno: 12,
            });
        }
        let (mut iter, mut more, mut prval): (OmapIterT, u8, c_int) = (std::ptr::null_mut(), 0, 0);
        // SAFETY: `op` is live; the out-pointers are valid until the operation has run (below).
        unsafe {
            (api.read_op_omap_get_vals2)(
                op,
                empty.as_ptr(),
                empty.as_ptr(),
                max,
                &mut iter,
                &mut more,
                &mut prval,
            )
        };
        // SAFETY: `op` and `io` are live; flags 0.
        let r = unsafe { (api.read_op_operate)(op, self.io, oid.as_ptr(), 0) };
        let mut out = BTreeMap::new();
        if r >= 0 && prval >= 0 && !iter.is_null() {
            loop {
                let (mut k, mut v) = (std::ptr::null_mut(), std::ptr::null_mut());
                let (mut kl, mut vl) = (0usize, 0usize);
                // SAFETY: `iter` is the operation's iterator, valid until `omap_get_end`.
                let n = unsafe { (api.omap_get_next2)(iter, &mut k, &mut v, &mut kl, &mut vl) };
                if n < 0 || k.is_null() {
                    break;
                }
                // SAFETY: librados points `k` and `v` at `kl` and `vl` bytes it owns until the
                // next call on the iterator; they are copied at once.
                let (key, val) = unsafe {
                    (
                        std::slice::from_raw_parts(k.cast::<u8>(), kl).to_vec(),
                        match v.is_null() {
                            true => vec![],
                            false => std::slice::from_raw_parts(v.cast::<u8>(), vl).to_vec(),
                        },
                    )
                };
                out.insert(String::from_utf8_lossy(&key).into_owned(), val);
            }
        }
        // SAFETY: ends the iterator (if any) and releases the operation, once each.
        unsafe {
            if !iter.is_null() {
                (api.omap_get_end)(iter);
            }
            (api.release_read_op)(op);
        }
        check("rados_read_op_operate", r)?;
        check("rados_read_op_omap_get_vals2", prval)?;
        if more != 0 {
            return Err(LibError::Call {
                call: "rados_read_op_omap_get_vals2",
                errno: 27,
            });
        }
        Ok(out)
    }

    /// Sets omap key `key` of `object` to `new` only if it holds `expected` now, in one
    /// operation the object's primary OSD orders against every other write: true when set,
    /// false when the key held something else (`ECANCELED`).
    pub fn omap_compare_and_set(
        &self,
        object: &str,
        key: &str,
        expected: &[u8],
        new: &[u8],
    ) -> Result<bool, LibError> {
        let api = api()?;
        let k = cstr("omap key", key)?;
        let (keys, vals, lens) = ([k.as_ptr()], [new.as_ptr().cast::<c_char>()], [new.len()]);
        let mut prval: c_int = 0;
        let done = self.write_op(object, "rados_write_op_omap_cmp", |op| {
            // SAFETY: `op` is live; `k`, `expected`, the arrays and `prval` outlive the
            // operation, which runs before `write_op` returns.
            unsafe {
                (api.write_op_omap_cmp)(
                    op,
                    k.as_ptr(),
                    CMP_EQ,
                    expected.as_ptr().cast(),
                    expected.len(),
                    &mut prval,
                );
                (api.write_op_omap_set)(op, keys.as_ptr(), vals.as_ptr(), lens.as_ptr(), 1);
            }
        });
        match done {
            Ok(()) => Ok(true),
            Err(LibError::Call { errno, .. }) if errno == ECANCELED => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes omap key `key` of `object` (ENOENT when the object is missing).
    pub fn omap_remove(&self, object: &str, key: &str) -> Result<(), LibError> {
        let api = api()?;
        let key = cstr("omap key", key)?;
        let keys = [key.as_ptr()];
        self.write_op(object, "rados_write_op_omap_rm_keys", |op| {
            // SAFETY: `op` is live; the array holds one key and outlives the operation.
            unsafe { (api.write_op_omap_rm_keys)(op, keys.as_ptr(), 1) }
        })
    }

    /// One write operation on `object`: made, filled by `fill`, run, released.
    fn write_op(
        &self,
        object: &str,
        call: &'static str,
        fill: impl FnOnce(WriteOpT),
    ) -> Result<(), LibError> {
        let api = api()?;
        let oid = cstr("object name", object)?;
        // SAFETY: returns a new operation (or null), released below, once.
        let op = unsafe { (api.create_write_op)() };
        if op.is_null() {
            return Err(LibError::Call { call, errno: 12 });
        }
        fill(op);
        // SAFETY: `op` and `io` are live; a null mtime means now; flags 0.
        let r =
            unsafe { (api.write_op_operate)(op, self.io, oid.as_ptr(), std::ptr::null_mut(), 0) };
        // SAFETY: releases the operation made above, once.
        unsafe { (api.release_write_op)(op) };
        check(call, r)
    }
}

/// An image held open the way SPDK's rbd bdev holds it while the bdev exists
/// (`bdev_rbd_init_context`: `rbd_open`, then `rbd_update_watch`; `bdev_rbd_free`:
/// `rbd_update_unwatch`, `rbd_flush`, `rbd_close`). Ceph lists the open image's watcher, as it
/// lists SNAP's. Closed when dropped.
pub struct OpenImage {
    /// Keeps the cluster connected while the image is open.
    _rados: Arc<Rados>,
    io: IoctxT,
    img: ImageT,
    watch: Option<u64>,
    /// Set by librbd's update callback (a header change: a resize, for one).
    changed: Box<AtomicBool>,
}

// SAFETY: librbd image handles may be used from any thread (SPDK calls them from its reactors
// and librbd's own threads); this type only calls thread-safe functions on them.
unsafe impl Send for OpenImage {}
// SAFETY: as above.
unsafe impl Sync for OpenImage {}

impl std::fmt::Debug for OpenImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenImage")
            .field("watch", &self.watch)
            .finish()
    }
}

/// librbd's update callback: marks the image changed (called on a librbd thread).
extern "C" fn image_updated(arg: *mut c_void) {
    // SAFETY: `arg` is the `AtomicBool` boxed in the `OpenImage` that registered this callback;
    // the watch is unregistered before the box is dropped.
    let changed = unsafe { &*(arg as *const AtomicBool) };
    changed.store(true, Ordering::SeqCst);
}

impl Rados {
    /// Opens `pool/image` read-write and watches it for updates, as SPDK does. Blocking.
    pub fn open_image(self: &Arc<Self>, pool: &str, image: &str) -> Result<OpenImage, LibError> {
        let api = api()?;
        let (pool, image) = (cstr("pool_name", pool)?, cstr("rbd_name", image)?);
        let mut io: IoctxT = std::ptr::null_mut();
        // SAFETY: a connected handle, a valid out-pointer and a string outliving the call.
        check("rados_ioctx_create", unsafe {
            (api.ioctx_create)(self.handle, pool.as_ptr(), &mut io)
        })?;
        let mut img: ImageT = std::ptr::null_mut();
        // SAFETY: `io` is live; a null snapshot name means the head.
        let opened = check("rbd_open", unsafe {
            (api.open)(io, image.as_ptr(), &mut img, std::ptr::null())
        });
        if let Err(e) = opened {
            // SAFETY: destroys the pool handle created above, once.
            unsafe { (api.ioctx_destroy)(io) };
            return Err(e);
        }
        let mut me = OpenImage {
            _rados: self.clone(),
            io,
            img,
            watch: None,
            changed: Box::new(AtomicBool::new(false)),
        };
        let mut handle = 0u64;
        let arg = &*me.changed as *const AtomicBool as *mut c_void;
        // SAFETY: `img` is open; `arg` points into a box that outlives the watch (see Drop).
        // SPDK logs a failed watch and goes on; so does this.
        if unsafe { (api.update_watch)(img, &mut handle, image_updated, arg) } >= 0 {
            me.watch = Some(handle);
        }
        Ok(me)
    }
}

impl OpenImage {
    /// The image's size now (librbd refreshes the header when it changed).
    pub fn size(&self) -> Result<u64, LibError> {
        let api = api()?;
        let mut size = 0u64;
        // SAFETY: the image is open until `self` is dropped.
        check("rbd_get_size", unsafe {
            (api.get_size)(self.img, &mut size)
        })?;
        Ok(size)
    }

    /// Whether librbd said the image changed since the last call.
    pub fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::SeqCst)
    }

    /// Reads `buf.len()` bytes at `offset` (`rbd_read`; librbd reads past the end as an error).
    /// Blocking.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), LibError> {
        let api = api()?;
        all_of(buf.len(), "rbd_read", |done| {
            let rest = &mut buf[done..];
            // SAFETY: the image is open until `self` is dropped; `rest` is valid for its length.
            unsafe {
                (api.read)(
                    self.img,
                    offset + done as u64,
                    rest.len(),
                    rest.as_mut_ptr().cast(),
                )
            }
        })
    }

    /// Writes `data` at `offset` (`rbd_write`). Blocking.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), LibError> {
        let api = api()?;
        all_of(data.len(), "rbd_write", |done| {
            let rest = &data[done..];
            // SAFETY: as in `read_at`; librbd only reads from `rest`.
            unsafe {
                (api.write)(
                    self.img,
                    offset + done as u64,
                    rest.len(),
                    rest.as_ptr().cast(),
                )
            }
        })
    }

    /// Flushes writes to the cluster (`rbd_flush`). Blocking.
    pub fn flush(&self) -> Result<(), LibError> {
        let api = api()?;
        // SAFETY: the image is open until `self` is dropped.
        check("rbd_flush", unsafe { (api.flush)(self.img) })
    }

    /// Grows the image through this handle to `bytes` (SPDK's `bdev_rbd_resize` does the same).
    pub fn grow(&self, bytes: u64) -> Result<(), LibError> {
        let api = api()?;
        if self.size()? < bytes {
            // SAFETY: the image is open until `self` is dropped.
            check("rbd_resize", unsafe { (api.resize)(self.img, bytes) })?;
        }
        Ok(())
    }
}

/// Repeats `io(done)` (bytes done so far in, bytes done by this call or a negative errno out)
/// until `len` bytes are done; no progress is an I/O error.
fn all_of(
    len: usize,
    call: &'static str,
    mut io: impl FnMut(usize) -> isize,
) -> Result<(), LibError> {
    let mut done = 0usize;
    while done < len {
        match io(done) {
            n if n < 0 => {
                return Err(LibError::Call {
                    call,
                    errno: -(n as i32),
                })
            }
            0 => return Err(LibError::Call { call, errno: 5 }),
            n => done += n as usize,
        }
    }
    Ok(())
}

impl Drop for OpenImage {
    fn drop(&mut self) {
        let Ok(api) = api() else { return };
        // SAFETY: each handle was created in `open_image` and is released exactly once, here,
        // in SPDK's order: unwatch, flush, close the image, then its pool handle.
        unsafe {
            if let Some(h) = self.watch.take() {
                (api.update_unwatch)(self.img, h);
            }
            (api.flush)(self.img);
            (api.close)(self.img);
            (api.ioctx_destroy)(self.io);
        }
    }
}
