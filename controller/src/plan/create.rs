//! Creation: each wanted volume's chain — image, cluster registered in SNAP, bdev, subsystem,
//! namespace, controller (created suspended), attachment — then each controller's resume once
//! all its namespaces are attached. Existing matching objects are adopted; anything in the way
//! blocks the volume with the reason, and the rest of the fleet goes on.

use protocol::dpu::{BdevResize, NameRef};
use protocol::dpu::{ControllerInfo, DpuReport, FunctionRef, SnapInventory, SubsystemInfo};

use protocol::{
    AdoptImage, Command, CreateImage, FlattenImage, GrowImage, ImagePolicy, ImageRef, ImageState,
    ImageStatus, Ownership,
};

use super::place::DpuPlacement;
use super::teardown::ImageIndex;
use super::{
    names, snap_values, Action, Attachment, BdevSpec, Builder, ControllerSpec, HashMap, Known,
    NamespaceSpec, Observed, Options, Risk, SubsystemSpec, Target,
};
use crate::manifest::Volume;

/// What every volume's planning reads.
pub(super) struct Context<'a> {
    pub(super) observed: &'a Observed,
    pub(super) opts: &'a Options,
    pub(super) images: &'a ImageIndex<'a>,
    /// Clusters closed to writes by the health gate, with the reason.
    pub(super) halted: &'a std::collections::BTreeMap<&'a str, String>,
    /// DPUs whose state is not known: any of them may still expose an existing image.
    pub(super) silent: &'a [&'a str],
    /// Per cluster, the DPUs fenced off it (`unistor fence`): their SNAP can no longer reach
    /// its images, so they count as not exposing them; and nothing is exposed on them.
    pub(super) fenced: &'a std::collections::BTreeMap<&'a str, Vec<&'a protocol::FenceRecord>>,
}

impl Context<'_> {
    /// The fence of `dpu` on `cluster`, complete (`fenced`), if there is one.
    pub(super) fn fence(&self, cluster: &str, dpu: &str) -> Option<&protocol::FenceRecord> {
        self.fenced
            .get(cluster)?
            .iter()
            .copied()
            .find(|f| f.dpu == dpu && f.state == protocol::FenceState::Fenced)
    }
}

/// One DPU's volumes being planned: the steps made once per cluster or function, and the
/// attachments each controller's resume waits for.
pub(super) struct DpuChain<'a, 'f> {
    name: &'a str,
    report: Option<&'a DpuReport>,
    /// SNAP's install step on this DPU, when there is one.
    snap: Option<usize>,
    /// What every step on this DPU waits for (its removals, then SNAP).
    first: &'f [Option<usize>],
    /// Where the next volume's bdev is looked for first: SNAP lists bdevs in the order they
    /// were made, which is this DPU's volumes in name order, so a converged DPU finds each at
    /// once instead of scanning.
    bdev_hint: usize,
    s: &'f mut Scratch<'a>,
}

/// What planning a DPU's volumes keeps per cluster and per function: a handful of each, in
/// lists cleared for every DPU and whose allocations are kept from DPU to DPU.
#[derive(Default)]
pub(super) struct Scratch<'a> {
    /// Each cluster's registration in SNAP (the step, if one is needed).
    registered: Vec<(&'a str, Option<usize>)>,
    functions: Vec<Function<'a>>,
}

/// One function of the DPU, as planned so far.
struct Function<'a> {
    f: FunctionRef,
    /// Its subsystem and controller in the inventory.
    sub: Option<&'a SubsystemInfo>,
    ctrl: Option<&'a ControllerInfo>,
    /// The controller SNAP has bound to it, when one is.
    bound: Option<&'a str>,
    /// The steps creating its subsystem and its controller (if needed), once decided.
    subsystem: Option<Option<usize>>,
    controller: Option<Option<usize>>,
    /// The attachments its resume waits for.
    attaches: Vec<usize>,
    /// Whether its controller must be resumed.
    resume: bool,
}

/// The inventory planned against while SNAP is being (re)installed.
static EMPTY: SnapInventory = SnapInventory {
    functions: Vec::new(),
    subsystems: Vec::new(),
    controllers: Vec::new(),
    bdevs: Vec::new(),
    clusters: Vec::new(),
};

/// A volume the plan cannot go on with (the reason is in the plan's `blocked`).
struct Held;

/// Images found to be a wanted volume's own (cluster, position in its report): their volume
/// is wanted, so they are not gone.
pub(super) type Claims<'a> = Vec<(&'a str, u32)>;

impl<'a, 'f> DpuChain<'a, 'f> {
    /// DPU `name` (with its report, if any), whose steps wait for `first` and SNAP's install
    /// step `snap`; `s` is cleared for it.
    pub(super) fn new(
        name: &'a str,
        report: Option<&'a DpuReport>,
        snap: Option<usize>,
        first: &'f [Option<usize>],
        s: &'f mut Scratch<'a>,
    ) -> Self {
        s.registered.clear();
        s.functions.clear();
        Self {
            name,
            report,
            snap,
            first,
            bdev_hint: 0,
            s,
        }
    }

    /// Function `f` (its position in the scratch), its subsystem, controller (`ctrl`) and
    /// binding looked up in `inv` once per DPU.
    fn function(&mut self, inv: &'a SnapInventory, f: FunctionRef, ctrl: &str) -> usize {
        if let Some(at) = self.s.functions.iter().position(|g| g.f == f) {
            return at;
        }
        let dpu = self.name;
        self.s.functions.push(Function {
            f,
            sub: inv
                .subsystems
                .iter()
                .find(|s| names::is_nqn(&s.nqn, dpu, f)),
            ctrl: inv.controllers.iter().find(|c| c.name == ctrl),
            bound: inv
                .functions
                .iter()
                .find(|x| x.function == f)
                .and_then(|x| x.controller.as_deref()),
            subsystem: None,
            controller: None,
            attaches: Vec::new(),
            resume: false,
        });
        self.s.functions.len() - 1
    }

    /// Plans the volumes `placed` (in name order), then the resumes; the images found to be
    /// theirs go to `claims`.
    pub(super) fn plan(
        mut self,
        b: &mut Builder,
        cx: &Context<'a>,
        placed: &DpuPlacement<'a>,
        ctrl_names: &mut HashMap<FunctionRef, String>,
        claims: &mut Claims<'a>,
    ) {
        for k in 0..placed.len() {
            let _held: Result<(), Held> = self.volume(b, cx, placed, k, ctrl_names, claims);
        }
        self.resumes(b);
    }

    fn target(&self) -> Target {
        Target::Dpu(self.name.to_string())
    }

    fn volume(
        &mut self,
        b: &mut Builder,
        cx: &Context<'a>,
        placed: &DpuPlacement<'a>,
        k: usize,
        ctrl_names: &mut HashMap<FunctionRef, String>,
        claims: &mut Claims<'a>,
    ) -> Result<(), Held> {
        let v: &'a Volume = placed.volume(k);
        let report = self.ready(b, cx, v)?;
        let image_step = image(b, cx, v, claims)?;
        let inv: &'a SnapInventory = match (self.snap, report.inventory.as_ref()) {
            (None, Some(inv)) => inv,
            // SNAP is being (re)installed: plan against an empty SNAP.
            _ => &EMPTY,
        };
        let reg = self.register(b, inv, v);
        // `bdev_rbd_resize` grows the image through SNAP: a write, held with the image's.
        let may_write = !cx.halted.contains_key(v.cluster.as_str());
        let bdev_step = self.bdev(b, cx, inv, v, &[reg, image_step], may_write)?;
        let nsid = placed.nsid(k);
        let ctrl = ctrl_names
            .entry(v.function)
            .or_insert_with(|| names::controller(v.function));
        let f = self.function(inv, v.function, ctrl);
        let sub = self.subsystem(b, f);
        let have_sub = self.s.functions[f].sub;
        let ns_step = self.namespace(b, have_sub, v, nsid, &[sub, bdev_step])?;
        self.controller(b, f, v, ctrl, nsid, sub, ns_step)
    }

    /// The DPU's report, when the volume's cluster and DPU are both known.
    fn ready(&self, b: &mut Builder, cx: &Context<'a>, v: &Volume) -> Result<&'a DpuReport, Held> {
        let cluster = cx.observed.clusters.get(&v.cluster).and_then(Known::get);
        match (cluster, self.report) {
            (Some(_), Some(r)) => Ok(r),
            _ => {
                let unknown = if cluster.is_none() {
                    format!("cluster/{}", v.cluster)
                } else {
                    format!("dpu/{}", v.dpu)
                };
                b.block(
                    object(v),
                    format!("waiting for {unknown}: its state is unknown"),
                );
                Err(Held)
            }
        }
    }

    /// The volume's cluster registered in SNAP (once per DPU).
    fn register(&mut self, b: &mut Builder, inv: &SnapInventory, v: &'a Volume) -> Option<usize> {
        let cluster = v.cluster.as_str();
        if let Some(&(_, step)) = self.s.registered.iter().find(|(c, _)| *c == cluster) {
            return step;
        }
        let registered = inv
            .clusters
            .iter()
            .any(|c| names::unprefixed(c) == Some(cluster));
        let step = (!registered).then(|| {
            b.push(
                self.target(),
                Action::RegisterCluster {
                    name: names::cluster(cluster),
                    cluster: cluster.to_string(),
                },
                Risk::Safe,
                self.first,
                None,
            )
        });
        self.s.registered.push((cluster, step));
        step
    }

    /// The volume's bdev: created, adopted, or grown for the host (when the cluster may be
    /// written); held when another image's bdev has its name. `before`: the registration and
    /// the image steps.
    fn bdev(
        &mut self,
        b: &mut Builder,
        cx: &Context<'a>,
        inv: &SnapInventory,
        v: &Volume,
        before: &[Option<usize>],
        may_write: bool,
    ) -> Result<Option<usize>, Held> {
        let vname = v.name.as_str();
        let is_bdev = |name: &str| names::unprefixed(name) == Some(vname);
        let at = match inv.bdevs.get(self.bdev_hint) {
            Some(x) if is_bdev(&x.name) => Some(self.bdev_hint),
            _ => inv.bdevs.iter().position(|x| is_bdev(&x.name)),
        };
        if let Some(at) = at {
            self.bdev_hint = at + 1;
        }
        match at.map(|at| &inv.bdevs[at]) {
            Some(x)
                if x.pool.as_deref() == Some(v.pool.as_str())
                    && x.image.as_deref() == Some(v.image.as_str()) =>
            {
                self.qos(b, v, &x.name, Some(x.qos), None);
                if !may_write {
                    return Ok(None);
                }
                self.grow_for_host(
                    b,
                    v,
                    &x.name,
                    x.num_blocks * u64::from(x.block_size),
                    before[1],
                );
                Ok(None)
            }
            Some(x) => {
                b.block(
                    object(v),
                    format!(
                        "bdev {} on dpu/{} serves {}/{}",
                        x.name,
                        v.dpu,
                        x.pool.as_deref().unwrap_or("?"),
                        x.image.as_deref().unwrap_or("?")
                    ),
                );
                Err(Held)
            }
            None if self.held_before_a_bdev(b, cx, v, before[1]) => Err(Held),
            None => {
                let made = b.push(
                    self.target(),
                    Action::Send(Command::CreateBdev(BdevSpec {
                        name: names::bdev(vname),
                        cluster: names::cluster(&v.cluster),
                        pool: v.pool.to_string(),
                        image: v.image.to_string(),
                        block_size: snap_values::BLOCK_SIZE,
                    })),
                    Risk::Safe,
                    &[self.first, before].concat(),
                    Some(vname),
                );
                self.qos(b, v, &names::bdev(vname), None, Some(made));
                Ok(Some(made))
            }
        }
    }

    /// Bdev `name`'s QoS limits brought to the volume's (`have`: SPDK's now, None for a bdev
    /// made by step `made`): one `bdev_set_qos_limit`, live — the host keeps its device and
    /// nothing waits for it.
    fn qos(
        &self,
        b: &mut Builder,
        v: &Volume,
        name: &str,
        have: Option<protocol::dpu::QosLimits>,
        made: Option<usize>,
    ) {
        let have = have.unwrap_or_default();
        if have == v.qos {
            return;
        }
        if made.is_none() {
            b.drift(object(v), "qos", v.qos.to_string(), have.to_string());
        }
        let mut deps: Vec<Option<usize>> = self.first.to_vec();
        deps.push(made);
        b.push(
            self.target(),
            Action::Send(Command::SetBdevQos(protocol::dpu::BdevQos {
                name: name.to_string(),
                limits: v.qos,
            })),
            Risk::Safe,
            &deps,
            Some(v.name.as_str()),
        );
    }

    /// A bdev is to be made here for `v`'s image: held (true, with the reason) while that image
    /// is not known to be ours, or may be open on another DPU. An image this plan makes
    /// (`image_step`) is ours and nobody's elsewhere.
    fn held_before_a_bdev(
        &self,
        b: &mut Builder,
        cx: &Context<'a>,
        v: &Volume,
        image_step: Option<usize>,
    ) -> bool {
        if let Some(f) = cx.fence(&v.cluster, self.name) {
            b.block(
                object(v),
                format!(
                    "dpu/{} is fenced off cluster {} ({}): nothing is exposed there until `unistor unfence dpu/{}`",
                    self.name, v.cluster, f.reason, self.name
                ),
            );
            return true;
        }
        if image_step.is_some() {
            return false;
        }
        let Some((_, img)) = find_image(cx, v).filter(|(_, i)| i.state == ImageState::Live) else {
            return false;
        };
        if img.unverified {
            // Known from the pool's index alone: its own keys decide, and are not read yet.
            b.block(
                object(v),
                format!(
                    "image {}/{} is known from the pool's index only (its agent just started): held until its own keys are read",
                    v.pool, v.image
                ),
            );
            b.plan
                .unverified
                .push((v.cluster.clone(), v.pool.to_string(), v.image.to_string()));
            return true;
        }
        self.maybe_open_elsewhere(b, cx, v)
    }

    /// Held (true) while a DPU whose state is not known may still expose `v`'s existing image:
    /// an agent down or cut off leaves its SNAP serving its host, and one image is never open
    /// on two DPUs. The volume goes on when the silent DPUs report again (without it; or with
    /// it, and their removals of it come first).
    fn maybe_open_elsewhere(&self, b: &mut Builder, cx: &Context<'a>, v: &Volume) -> bool {
        let silent: Vec<String> = cx
            .silent
            .iter()
            .filter(|d| **d != self.name && cx.fence(&v.cluster, d).is_none())
            .map(|d| format!("dpu/{d}"))
            .collect();
        let named = match silent.len() {
            0 => return false,
            1 => format!("{} is", silent[0]),
            n if n > 3 => format!("{} and {} more are", silent[..3].join(", "), n - 3),
            _ => format!("{} are", silent.join(", ")),
        };
        b.block(
            object(v),
            format!(
                "image {}/{} exists and {named} not reporting: it may still be exposed there, and one image is never open on two DPUs; held until they report (or `unistor fence` them)",
                v.pool, v.image
            ),
        );
        true
    }

    /// The host sees the bdev's size: a grown image is not grown for the host until the bdev
    /// follows (SPDK's update watch does; `bdev_rbd_resize` makes sure, in MiB).
    fn grow_for_host(
        &self,
        b: &mut Builder,
        v: &Volume,
        bdev: &str,
        host_bytes: u64,
        image_step: Option<usize>,
    ) {
        if host_bytes >= v.size_bytes {
            return;
        }
        b.drift(
            object(v),
            "bdev.size",
            v.size_bytes.to_string(),
            host_bytes.to_string(),
        );
        if v.size_bytes.is_multiple_of(1 << 20) {
            b.push(
                self.target(),
                Action::Send(Command::ResizeBdev(BdevResize {
                    name: bdev.to_string(),
                    new_size_mib: v.size_bytes >> 20,
                })),
                Risk::HostVisible,
                &[self.first, &[image_step]].concat(),
                Some(v.name.as_str()),
            );
        } else {
            b.block(
                object(v),
                format!(
                    "bdev {bdev} shows the host {host_bytes} bytes; {} bytes is not a whole MiB, which SNAP's bdev_rbd_resize needs",
                    v.size_bytes
                ),
            );
        }
    }

    /// The function's subsystem (once per DPU and function).
    fn subsystem(&mut self, b: &mut Builder, f: usize) -> Option<usize> {
        if let Some(step) = self.s.functions[f].subsystem {
            return step;
        }
        let step = self.s.functions[f].sub.is_none().then(|| {
            let nqn = names::nqn(self.name, self.s.functions[f].f);
            b.push(
                self.target(),
                Action::Send(Command::CreateSubsystem(SubsystemSpec {
                    serial: snap_values::serial(&nqn),
                    nqn,
                    model: snap_values::MODEL.into(),
                    max_namespaces: snap_values::MAX_NAMESPACES,
                })),
                Risk::Safe,
                self.first,
                None,
            )
        });
        self.s.functions[f].subsystem = Some(step);
        step
    }

    /// The volume's namespace at its NSID; held when another namespace has the NSID.
    /// `before`: the subsystem and bdev steps.
    fn namespace(
        &self,
        b: &mut Builder,
        sub: Option<&SubsystemInfo>,
        v: &Volume,
        nsid: u32,
        before: &[Option<usize>],
    ) -> Result<Option<usize>, Held> {
        let vname = v.name.as_str();
        let nqn = || names::nqn(self.name, v.function);
        let have = sub.and_then(|s| s.namespaces.iter().find(|n| n.nsid == nsid));
        match have {
            Some(n)
                if names::unprefixed(&n.bdev) == Some(vname)
                    && n.uuid.eq_ignore_ascii_case(&v.uuid) =>
            {
                Ok(None)
            }
            Some(n) => {
                b.block(
                    object(v),
                    format!(
                        "NSID {nsid} of {} is taken by bdev {} (uuid {})",
                        nqn(),
                        n.bdev,
                        n.uuid
                    ),
                );
                Err(Held)
            }
            None => Ok(Some(b.push(
                self.target(),
                Action::Send(Command::CreateNamespace(NamespaceSpec {
                    nqn: nqn(),
                    nsid,
                    bdev: names::bdev(vname),
                    uuid: v.uuid.clone(),
                })),
                Risk::Safe,
                &[self.first, before].concat(),
                Some(vname),
            ))),
        }
    }

    /// The function's controller (once per DPU and function, created suspended) and the
    /// namespace attached to it; held when the function has a controller not unistor's.
    #[allow(clippy::too_many_arguments)]
    fn controller(
        &mut self,
        b: &mut Builder,
        f: usize,
        v: &Volume,
        ctrl: &str,
        nsid: u32,
        sub: Option<usize>,
        ns_step: Option<usize>,
    ) -> Result<(), Held> {
        let Function {
            ctrl: have, bound, ..
        } = self.s.functions[f];
        if let Some(other) = bound.filter(|c| *c != ctrl) {
            b.block(
                object(v),
                format!(
                    "function {} of dpu/{} is bound to controller {other}, not unistor's",
                    v.function, v.dpu
                ),
            );
            return Err(Held);
        }
        if let Some(c) = have.filter(|c| c.num_queues != v.queues) {
            b.drift(
                object(v),
                "queues",
                v.queues.to_string(),
                c.num_queues.to_string(),
            );
        }
        let ctrl_step = match self.s.functions[f].controller {
            Some(step) => step,
            None => {
                let step = have.is_none().then(|| {
                    b.push(
                        self.target(),
                        Action::Send(Command::CreateController(ControllerSpec {
                            name: ctrl.into(),
                            nqn: names::nqn(self.name, v.function),
                            function: v.function,
                            num_queues: v.queues,
                            mdts: snap_values::MDTS,
                        })),
                        Risk::Safe,
                        &[self.first, &[sub]].concat(),
                        None,
                    )
                });
                self.s.functions[f].controller = Some(step);
                step
            }
        };
        let function = &mut self.s.functions[f];
        if !have.is_some_and(|c| c.namespaces.contains(&nsid)) {
            let a = b.push(
                Target::Dpu(self.name.to_string()),
                Action::Send(Command::AttachNamespace(Attachment {
                    controller: ctrl.into(),
                    nsid,
                    force: false,
                })),
                Risk::Safe,
                &[ctrl_step, ns_step],
                Some(v.name.as_str()),
            );
            function.attaches.push(a);
            function.resume = true;
        }
        if !have.is_some_and(|c| c.state.eq_ignore_ascii_case("STARTED")) {
            function.resume = true;
        }
        Ok(())
    }

    /// Controllers resume after all their namespaces are attached (in function order).
    fn resumes(&mut self, b: &mut Builder) {
        let functions = &mut self.s.functions;
        functions.sort_unstable_by_key(|x| x.f);
        for x in functions.iter().filter(|x| x.resume) {
            let mut deps: Vec<Option<usize>> = x.attaches.iter().map(|&a| Some(a)).collect();
            deps.push(x.controller.flatten());
            b.push(
                Target::Dpu(self.name.to_string()),
                Action::Send(Command::ResumeController(NameRef {
                    name: names::controller(x.f),
                })),
                Risk::Safe,
                &deps,
                None,
            );
        }
    }
}

pub(super) fn object(v: &Volume) -> String {
    format!("volume/{}", v.name)
}

/// The volume's image: created, restored from the trash, its policy rewritten, grown; held when
/// it belongs to someone else. The step the SNAP chain waits for, if any.
fn image<'a>(
    b: &mut Builder,
    cx: &Context<'a>,
    v: &'a Volume,
    claims: &mut Claims<'a>,
) -> Result<Option<usize>, Held> {
    let Some(why) = cx.halted.get(v.cluster.as_str()) else {
        return image_steps(b, cx, v, claims);
    };
    // Closed to writes: whatever the image needs is held back, with the reason. A volume whose
    // image must first be made (or restored) waits whole; one whose image is only to be grown
    // or relabelled keeps its SNAP chain.
    let first = b.plan.steps.len();
    let step = image_steps(b, cx, v, claims)?;
    if b.plan.steps.len() == first {
        return Ok(step);
    }
    b.plan.steps.truncate(first);
    let exists = find_image(cx, v).is_some_and(|(_, i)| i.state == ImageState::Live);
    b.block(object(v), why.clone());
    if exists {
        Ok(None)
    } else {
        Err(Held)
    }
}

/// Volume `v`'s image, with its position in its cluster's report.
fn find_image<'a>(cx: &Context<'a>, v: &Volume) -> Option<(u32, &'a ImageStatus)> {
    cx.images
        .get(v.cluster.as_str())?
        .find(v.pool.as_str(), v.image.as_str())
}

/// [`image`] with the cluster open to writes.
fn image_steps<'a>(
    b: &mut Builder,
    cx: &Context<'a>,
    v: &'a Volume,
    claims: &mut Claims<'a>,
) -> Result<Option<usize>, Held> {
    let img = find_image(cx, v);
    let ceph = || Target::Cluster(v.cluster.clone());
    let created = |b: &mut Builder| {
        if let Some(why) = source_missing(cx, v) {
            b.block(object(v), why);
            return Err(Held);
        }
        let c = b.push(
            ceph(),
            create(&cx.opts.owner, v),
            Risk::Safe,
            &[],
            Some(v.name.as_str()),
        );
        // A new clone's depth: its source's (when reported) and one more.
        let depth = source_image(cx, v).and_then(|parent| {
            Some(parent.clone_depth.unwrap_or(0) + 1).filter(|_| {
                parent.clone_depth.is_some() || (parent.parent.is_none() && !parent.unverified)
            })
        });
        flatten(b, &cx.opts.owner, v, depth, Some(c));
        super::snapshots::plan(b, cx, v, None, Some(c));
        Ok(Some(c))
    };
    match img {
        None => created(b),
        Some((at, i)) => match i.state {
            ImageState::Missing => created(b),
            ImageState::Trashed { .. } => {
                b.drift(object(v), "rbd.state", "live".into(), "trashed".into());
                Ok(Some(b.push(
                    ceph(),
                    Action::Send(Command::RestoreImage(ImageRef {
                        pool: v.pool.to_string(),
                        image: v.image.to_string(),
                    })),
                    Risk::Safe,
                    &[],
                    Some(v.name.as_str()),
                )))
            }
            ImageState::Live => {
                let step = live_image(b, cx.opts, v, i, || {
                    claims.push((v.cluster.as_str(), at));
                })?;
                if i.parent.is_some() {
                    flatten(b, &cx.opts.owner, v, i.clone_depth, None);
                }
                super::snapshots::plan(b, cx, v, Some(i), None);
                Ok(step)
            }
        },
    }
}

/// The image volume `v` is cloned from, as its cluster reports it.
fn source_image<'a>(cx: &Context<'a>, v: &Volume) -> Option<&'a ImageStatus> {
    let c = v.clone_from.as_ref()?;
    let images = cx.images.get(v.cluster.as_str())?;
    images
        .find(c.pool.as_str(), c.image.as_str())
        .map(|(_, i)| i)
}

/// Why a volume cloned from another volume's snapshot cannot be made yet: that snapshot is
/// not reported (its volume's plan takes it; the next pass clones it).
fn source_missing(cx: &Context<'_>, v: &Volume) -> Option<String> {
    let c = v.clone_from.as_ref()?;
    let from = c.volume.as_ref()?;
    let img = source_image(cx, v);
    let there = img.is_some_and(|i| i.snapshots.iter().any(|s| s.name == c.snapshot.as_str()));
    (!there).then(|| {
        format!(
            "waiting for snapshot {c} of volume {from} (taken by that volume's steps when its `snapshots.names` declares it)"
        )
    })
}

/// A clone's flatten, when the volume asks for it (`source.flatten: always`, or
/// `source.maxDepth` below the clone's `depth` when that is known): its own step, after the
/// create when the image is made in the same pass; nothing waits for it (the host reads the
/// clone the same before and after).
fn flatten(b: &mut Builder, owner: &str, v: &Volume, depth: Option<u32>, after: Option<usize>) {
    let wanted = v
        .clone_from
        .as_ref()
        .is_some_and(|c| c.flatten || c.max_depth.zip(depth).is_some_and(|(max, d)| d > max));
    if !wanted {
        return;
    }
    b.push(
        Target::Cluster(v.cluster.clone()),
        Action::Send(Command::FlattenImage(FlattenImage {
            pool: v.pool.to_string(),
            image: v.image.to_string(),
            owner: ownership(owner, v),
        })),
        Risk::Safe,
        &[after],
        Some(v.name.as_str()),
    );
}

/// A live image that carries no owner (made outside unistor): adopted when the volume asks for
/// it and nobody has it open, never shrunk; otherwise the volume is held, and says why.
fn adopt(b: &mut Builder, owner: &str, v: &Volume, i: &ImageStatus) -> Result<Option<usize>, Held> {
    let what = format!(
        "image {}/{} exists and carries no owner (made outside unistor)",
        v.pool, v.image
    );
    let refuse = |b: &mut Builder, why: String| {
        b.block(object(v), why);
        Err(Held)
    };
    if !v.adopt {
        return refuse(
            b,
            format!("{what}: not owned, so not used; set `rbd: {{adopt: true}}` on the volume to take it over"),
        );
    }
    if let Some(w) = i.watchers.as_ref().filter(|w| !w.is_empty()) {
        return refuse(
            b,
            format!(
                "{what} and is in use (watchers {}): adoption refused",
                w.join(", ")
            ),
        );
    }
    if i.size_bytes > v.size_bytes {
        return refuse(
            b,
            format!(
                "{what} and holds {} bytes, more than the volume's {}: adoption refused (it would never be shrunk; give the volume at least the image's size)",
                i.size_bytes, v.size_bytes
            ),
        );
    }
    let ceph = || Target::Cluster(v.cluster.clone());
    let vname = v.name.as_str();
    let adopted = b.push(
        ceph(),
        Action::Send(Command::AdoptImage(Box::new(AdoptImage {
            pool: v.pool.to_string(),
            image: v.image.to_string(),
            owner: ownership(owner, v),
            policy: Some(image_policy(v)),
        }))),
        Risk::Safe,
        &[],
        Some(vname),
    );
    if i.size_bytes == v.size_bytes {
        return Ok(Some(adopted));
    }
    b.drift(
        object(v),
        "size",
        v.size_bytes.to_string(),
        i.size_bytes.to_string(),
    );
    Ok(Some(grow(b, owner, v, i.size_bytes, Some(adopted))))
}

/// Grows volume `v`'s image from `from_bytes` to the manifest's size, after `after`.
fn grow(b: &mut Builder, owner: &str, v: &Volume, from_bytes: u64, after: Option<usize>) -> usize {
    b.push(
        Target::Cluster(v.cluster.clone()),
        Action::GrowImage {
            from_bytes,
            grow: GrowImage {
                pool: v.pool.to_string(),
                image: v.image.to_string(),
                size_bytes: v.size_bytes,
                owner: ownership(owner, v),
            },
        },
        Risk::Safe,
        &[after],
        Some(v.name.as_str()),
    )
}

fn create(owner: &str, v: &Volume) -> Action {
    Action::Send(Command::CreateImage(Box::new(CreateImage {
        pool: v.pool.to_string(),
        image: v.image.to_string(),
        size_bytes: v.size_bytes,
        features: vec![],
        owner: ownership(owner, v),
        policy: Some(image_policy(v)),
        clone_from: v.clone_from.as_ref().map(|c| protocol::SnapshotRef {
            pool: c.pool.to_string(),
            image: c.image.to_string(),
            snapshot: c.snapshot.to_string(),
        }),
    })))
}

/// The keys that make an image this deployment's and this volume's.
fn ownership(owner: &str, v: &Volume) -> Ownership {
    Ownership {
        managed_by: owner.to_string(),
        volume: v.name.to_string(),
    }
}

/// The volume's deletion policy and trash retention, as written on its image.
fn image_policy(v: &Volume) -> ImagePolicy {
    ImagePolicy {
        deletion: v.deletion_policy,
        trash_retention_secs: v.trash_retention.as_secs(),
    }
}

/// A live image: ours and this volume's (then `ours` is called), or held; its policy and size
/// brought to the manifest (never shrunk).
fn live_image(
    b: &mut Builder,
    opts: &Options,
    v: &Volume,
    i: &ImageStatus,
    ours: impl FnOnce(),
) -> Result<Option<usize>, Held> {
    let vname = v.name.as_str();
    let ceph = || Target::Cluster(v.cluster.clone());
    let owner = i.metadata.managed_by();
    let owned_by = i.metadata.volume();
    if owner.is_none() && owned_by.is_none() {
        return adopt(b, &opts.owner, v, i);
    }
    if owner != Some(opts.owner.as_str()) || owned_by != Some(vname) {
        b.block(
            object(v),
            format!(
                "image {}/{} belongs to {}/{}, not to this volume",
                v.pool,
                v.image,
                owner.unwrap_or("-"),
                owned_by.unwrap_or("-")
            ),
        );
        return Err(Held);
    }
    ours();
    let (policy, retain_secs) = (v.deletion_policy.as_str(), v.trash_retention.as_secs());
    // Absent means Retain; an unknown name is drift the create rewrites.
    let have_retention = i.metadata.retention_secs();
    if !i.metadata.policy_is(v.deletion_policy) || have_retention != Some(retain_secs) {
        let have_policy = i.metadata.policy().unwrap_or("Retain");
        b.drift(
            object(v),
            "deletionPolicy",
            format!("{policy}/{retain_secs}s"),
            format!("{have_policy}/{}s", have_retention.unwrap_or(0)),
        );
        // The create command is idempotent and rewrites the policy.
        if i.size_bytes == v.size_bytes {
            b.push(ceph(), create(&opts.owner, v), Risk::Safe, &[], Some(vname));
        }
    }
    if i.size_bytes == v.size_bytes {
        return Ok(None);
    }
    b.drift(
        object(v),
        "size",
        v.size_bytes.to_string(),
        i.size_bytes.to_string(),
    );
    if i.size_bytes > v.size_bytes {
        b.block(
            object(v),
            format!(
                "shrinking from {} to {} bytes is refused: grow the manifest back or move the data",
                i.size_bytes, v.size_bytes
            ),
        );
        return Ok(None);
    }
    Ok(Some(grow(b, &opts.owner, v, i.size_bytes, None)))
}
