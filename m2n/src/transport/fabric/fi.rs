//! Owned libfabric objects and the header's inline calls.
//!
//! Each handle owns one `fid` and closes it in `Drop`; children hold their
//! parents (`Arc`) so a domain outlives its endpoints, queues and memory
//! registrations. libfabric's `fi_domain`, `fi_writemsg`, `fi_cq_readfrom`
//! and friends are `static inline` in the C header: they call through the
//! object's ops table, and so do the methods here.

// bindgen types the header's constants by their values (u32 or u64), which
// may differ between libfabric versions: every use casts to the field's type.
#![allow(clippy::unnecessary_cast)]

use std::ffi::{CStr, CString};
use std::fmt;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use m2n_fabric_sys as sys;

/// The libfabric API version m2n is written against (1.14 or newer runs it).
pub(crate) const API_VERSION: u32 = sys::fi_version_of(1, 14);

/// The loaded library. Every libfabric object m2n holds was made after
/// [`sys::library`] succeeded (the transport loads it first), so this
/// cannot fail where it is called.
pub(crate) fn lib() -> &'static sys::LibFabric {
    sys::library().expect("libfabric is loaded before any of its objects exist")
}

/// `FI_ADDR_NOTAVAIL` (`(uint64_t)-1` in the header, which bindgen skips).
pub(crate) const ADDR_NOTAVAIL: sys::fi_addr_t = u64::MAX;
/// `FI_ADDR_UNSPEC`: a receive from any peer (also `(uint64_t)-1`).
pub(crate) const ADDR_UNSPEC: sys::fi_addr_t = u64::MAX;

/// A libfabric call that failed: the call and libfabric's error text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FiError {
    pub op: &'static str,
    /// The positive `FI_E*` / errno code.
    pub code: i32,
}

impl FiError {
    pub(crate) fn new(op: &'static str, ret: i64) -> Self {
        Self {
            op,
            code: ret.unsigned_abs().min(i32::MAX as u64) as i32,
        }
    }

    pub(crate) fn is_again(&self) -> bool {
        self.code == sys::FI_EAGAIN as i32
    }

    /// Whether the call was broken off by the watchdog (see [`guarded`]).
    pub(crate) fn is_broken_off(&self) -> bool {
        self.code == BROKEN_OFF
    }
}

/// [`FiError::code`] of a call the watchdog broke off (no errno is this).
const BROKEN_OFF: i32 = i32::MAX - 1;

/// libfabric's text for error `code`.
pub(crate) fn strerror(code: i32) -> String {
    // SAFETY: fi_strerror returns a static NUL-terminated string for any code.
    unsafe { CStr::from_ptr(lib().fi_strerror(code)) }
        .to_string_lossy()
        .into_owned()
}

impl fmt::Display for FiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_broken_off() {
            return write!(f, "{}: never returned, broken off by the watchdog", self.op);
        }
        write!(f, "{}: {} ({})", self.op, strerror(self.code), self.code)
    }
}

/// Makes one libfabric call, `call`, so that the transport's watchdog can
/// break it off when it never returns (a peer that died inside the
/// provider holding a lock: see the watchdog module). A call broken off
/// marks `fabric` wedged: whatever it was doing is abandoned with the
/// provider's locks it held, so no object of that fabric may be called or
/// closed again (the handles then leak instead of closing).
///
/// `call` is `Copy`, so it owns nothing to drop: its frame may be left by
/// a jump.
fn guarded<F>(fabric: &Fabric, op: &'static str, call: F) -> Result<isize, FiError>
where
    F: FnOnce() -> isize + Copy,
{
    /// Runs the `F` at `arg`, copied out: nothing is left to drop here.
    unsafe extern "C" fn run<F: FnOnce() -> isize + Copy>(arg: *mut libc::c_void) -> libc::c_long {
        // SAFETY: `arg` points at the `F` that `guarded` passed, alive
        // for the whole call; `F: Copy` makes the copy a plain read.
        let f = unsafe { *arg.cast::<F>() };
        f() as libc::c_long
    }
    if fabric.is_wedged() {
        return Err(FiError {
            op,
            code: BROKEN_OFF,
        });
    }
    let mut escaped = 0;
    // SAFETY: `run::<F>` is called with a pointer to `call`, which lives
    // on this frame until m2n_fi_guarded returns; `run` and `call` own
    // nothing that needs dropping, so the jump of a broken-off call skips
    // no destructor.
    let ret = unsafe {
        sys::m2n_fi_guarded(
            run::<F>,
            (&call as *const F).cast_mut().cast(),
            &mut escaped,
        )
    };
    if escaped != 0 {
        fabric.wedged.store(true, Ordering::Release);
        return Err(FiError {
            op,
            code: BROKEN_OFF,
        });
    }
    Ok(ret as isize)
}

fn check(op: &'static str, ret: i64) -> Result<(), FiError> {
    if ret < 0 {
        Err(FiError::new(op, ret))
    } else {
        Ok(())
    }
}

/// Closes `fid` (the header's `fi_close`).
///
/// # Safety
/// `fid` is a live libfabric object nothing else uses after this call.
unsafe fn close(fid: *mut sys::fid) {
    // SAFETY: the caller's contract; every fid has an ops table with close.
    unsafe {
        if let Some(close) = (*(*fid).ops).close {
            close(fid);
        }
    }
}

/// An `fi_info` list or entry m2n owns (freed with `fi_freeinfo`).
#[derive(Debug)]
pub(crate) struct Info(*mut sys::fi_info);

// SAFETY: plain data owned by this handle; libfabric keeps no reference to it.
unsafe impl Send for Info {}
// SAFETY: as above; only read through `&self`.
unsafe impl Sync for Info {}

impl Drop for Info {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: allocated by fi_dupinfo / fi_getinfo and owned here.
            unsafe { lib().fi_freeinfo(self.0) }
        }
    }
}

/// What m2n asks of a provider (see [`Info::hints`]).
#[derive(Debug, Clone)]
pub(crate) struct Wants {
    pub provider: Option<String>,
    pub domain: Option<String>,
    pub caps: u64,
    pub mr_mode: u32,
    pub msg_order: u64,
}

impl Info {
    /// Hints for `fi_getinfo`: reliable datagram endpoints with `wants`.
    pub(crate) fn hints(wants: &Wants) -> Result<Info, FiError> {
        // SAFETY: fi_dupinfo(NULL) is the header's fi_allocinfo().
        let h = unsafe { lib().fi_dupinfo(ptr::null()) };
        if h.is_null() {
            return Err(FiError::new("fi_allocinfo", -(libc::ENOMEM as i64)));
        }
        let info = Info(h);
        // SAFETY: fi_allocinfo allocates every attribute struct; strings
        // set here are strdup'ed, which fi_freeinfo frees.
        unsafe {
            (*h).caps = wants.caps;
            (*h).mode = sys::FI_CONTEXT as u64 | sys::FI_CONTEXT2;
            (*(*h).ep_attr).type_ = sys::FI_EP_RDM;
            (*(*h).domain_attr).mr_mode = wants.mr_mode as i32;
            (*(*h).domain_attr).threading = sys::FI_THREAD_SAFE;
            (*(*h).tx_attr).msg_order = wants.msg_order;
            (*(*h).rx_attr).msg_order = wants.msg_order;
            if let Some(p) = &wants.provider {
                let c = CString::new(p.as_str())
                    .map_err(|_| FiError::new("M2N_FI_PROVIDER", -(libc::EINVAL as i64)))?;
                (*(*h).fabric_attr).prov_name = libc::strdup(c.as_ptr());
            }
            if let Some(d) = &wants.domain {
                let c = CString::new(d.as_str())
                    .map_err(|_| FiError::new("M2N_FI_DOMAIN", -(libc::EINVAL as i64)))?;
                (*(*h).domain_attr).name = libc::strdup(c.as_ptr());
            }
        }
        Ok(info)
    }

    /// `fi_getinfo` with `hints`: the providers that match, best first.
    pub(crate) fn get(hints: &Info) -> Result<Info, FiError> {
        let mut out = ptr::null_mut();
        // SAFETY: valid hints; `out` receives a list this handle then owns.
        let ret = unsafe {
            lib().fi_getinfo(API_VERSION, ptr::null(), ptr::null(), 0, hints.0, &mut out)
        };
        check("fi_getinfo", ret as i64)?;
        Ok(Info(out))
    }

    /// The entries of this list, in order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = &sys::fi_info> {
        let mut p = self.0;
        std::iter::from_fn(move || {
            // SAFETY: a list owned by self; `next` is null-terminated.
            let e = unsafe { p.as_ref()? };
            p = e.next;
            Some(e)
        })
    }

    /// A copy of one entry (its own allocation, `next` cleared).
    pub(crate) fn dup(entry: &sys::fi_info) -> Result<Info, FiError> {
        // SAFETY: a valid entry; fi_dupinfo copies exactly one.
        let p = unsafe { lib().fi_dupinfo(entry) };
        if p.is_null() {
            return Err(FiError::new("fi_dupinfo", -(libc::ENOMEM as i64)));
        }
        Ok(Info(p))
    }

    /// Replaces the source address with the string `addr` (providers
    /// that name endpoints by strings, like shm).
    pub(crate) fn set_src_addr(&self, addr: &str) -> Result<(), FiError> {
        let c = CString::new(addr).map_err(|_| FiError::new("src_addr", -(libc::EINVAL as i64)))?;
        // SAFETY: an entry this handle owns; fi_freeinfo frees src_addr
        // with free(), so it is replaced by a strdup'ed string.
        unsafe {
            let dup = libc::strdup(c.as_ptr());
            if dup.is_null() {
                return Err(FiError::new("strdup", -(libc::ENOMEM as i64)));
            }
            libc::free((*self.0).src_addr);
            (*self.0).src_addr = dup.cast();
            (*self.0).src_addrlen = addr.len() + 1;
        }
        Ok(())
    }

    pub(crate) fn get_ref(&self) -> &sys::fi_info {
        // SAFETY: non-null for every Info built by dup/get with a match.
        unsafe { &*self.0 }
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::fi_info {
        self.0
    }
}

/// The provider name of an entry (`tcp;ofi_rxm`).
pub(crate) fn prov_name(e: &sys::fi_info) -> String {
    cstr_field(
        // SAFETY: fabric_attr is set on every fi_getinfo result.
        unsafe { e.fabric_attr.as_ref() }.map_or(ptr::null(), |a| a.prov_name),
    )
}

/// The fabric and domain names of an entry.
pub(crate) fn fabric_domain(e: &sys::fi_info) -> (String, String) {
    // SAFETY: attribute structs of a fi_getinfo result, or null.
    unsafe {
        (
            cstr_field(e.fabric_attr.as_ref().map_or(ptr::null(), |a| a.name)),
            cstr_field(e.domain_attr.as_ref().map_or(ptr::null(), |a| a.name)),
        )
    }
}

fn cstr_field(p: *const libc::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: libfabric's attribute strings are NUL-terminated.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[derive(Debug)]
pub(crate) struct Fabric {
    ptr: *mut sys::fid_fabric,
    /// A call into one of this fabric's objects was broken off (see
    /// [`guarded`]): none may be called or closed again.
    wedged: AtomicBool,
}

#[derive(Debug)]
pub(crate) struct Domain {
    ptr: *mut sys::fid_domain,
    _fabric: Arc<Fabric>,
}

#[derive(Debug)]
pub(crate) struct Av {
    ptr: *mut sys::fid_av,
    _domain: Arc<Domain>,
}

#[derive(Debug)]
pub(crate) struct Cq {
    ptr: *mut sys::fid_cq,
    _domain: Arc<Domain>,
}

/// A reliable datagram endpoint, bound to its address vector and queue.
#[derive(Debug)]
pub(crate) struct Ep {
    ptr: *mut sys::fid_ep,
    _av: Arc<Av>,
    _cq: Arc<Cq>,
}

/// A memory registration.
#[derive(Debug)]
pub(crate) struct Mr {
    ptr: *mut sys::fid_mr,
    _domain: Arc<Domain>,
}

// SAFETY: the domain is opened FI_THREAD_SAFE, so its objects may be used
// and closed from any thread.
unsafe impl Send for Fabric {}
// SAFETY: as above.
unsafe impl Sync for Fabric {}
// SAFETY: as above.
unsafe impl Send for Domain {}
// SAFETY: as above.
unsafe impl Sync for Domain {}
// SAFETY: as above.
unsafe impl Send for Av {}
// SAFETY: as above.
unsafe impl Sync for Av {}
// SAFETY: as above.
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}
// SAFETY: as above.
unsafe impl Send for Ep {}
// SAFETY: as above.
unsafe impl Send for Mr {}
// SAFETY: as above; the key and descriptor are only read.
unsafe impl Sync for Mr {}

macro_rules! closes {
    ($t:ty) => {
        impl Drop for $t {
            fn drop(&mut self) {
                // A wedged fabric's objects may be locked by the call that
                // was broken off: closing could wait for ever. They leak.
                if self.fabric().is_wedged() {
                    return;
                }
                // SAFETY: owned here; children hold an Arc of their parent,
                // so nothing opened from this object is still open.
                unsafe { close(self.fid()) }
            }
        }
    };
}

impl Fabric {
    pub(crate) fn open(info: &Info) -> Result<Arc<Fabric>, FiError> {
        let mut f = ptr::null_mut();
        // SAFETY: fabric_attr of a fi_getinfo entry.
        let ret = unsafe { lib().fi_fabric((*info.0).fabric_attr, &mut f, ptr::null_mut()) };
        check("fi_fabric", ret as i64)?;
        Ok(Arc::new(Fabric {
            ptr: f,
            wedged: AtomicBool::new(false),
        }))
    }
    fn fid(&self) -> *mut sys::fid {
        // SAFETY: `fid` is the first member of every libfabric object.
        unsafe { &mut (*self.ptr).fid }
    }
    fn fabric(&self) -> &Fabric {
        self
    }

    /// Whether a call into this fabric's objects was broken off.
    pub(crate) fn is_wedged(&self) -> bool {
        self.wedged.load(Ordering::Acquire)
    }
}
closes!(Fabric);

impl Domain {
    pub(crate) fn open(fabric: &Arc<Fabric>, info: &Info) -> Result<Arc<Domain>, FiError> {
        let mut d = ptr::null_mut();
        // SAFETY: the header's fi_domain: fabric->ops->domain.
        let ret = unsafe {
            let op = (*(*fabric.ptr).ops).domain.expect("fi_ops_fabric.domain");
            op(fabric.ptr, info.0, &mut d, ptr::null_mut())
        };
        check("fi_domain", ret as i64)?;
        Ok(Arc::new(Domain {
            ptr: d,
            _fabric: fabric.clone(),
        }))
    }
    fn fid(&self) -> *mut sys::fid {
        // SAFETY: as for Fabric.
        unsafe { &mut (*self.ptr).fid }
    }
    fn fabric(&self) -> &Fabric {
        &self._fabric
    }

    /// `fi_mr_regattr`: registers `len` bytes at `addr` for `access`, in
    /// host memory or, with `cuda_device`, in that GPU's memory.
    ///
    /// # Safety
    /// The memory stays valid until the returned registration is dropped.
    pub(crate) unsafe fn register(
        self: &Arc<Domain>,
        addr: *mut u8,
        len: usize,
        access: u64,
        requested_key: u64,
        cuda_device: Option<i32>,
    ) -> Result<Mr, FiError> {
        let iov = libc::iovec {
            iov_base: addr.cast(),
            iov_len: len,
        };
        let mut attr = sys::fi_mr_attr {
            mr_iov: &iov,
            iov_count: 1,
            access,
            requested_key,
            ..Default::default()
        };
        if let Some(dev) = cuda_device {
            attr.iface = sys::FI_HMEM_CUDA;
            attr.device.cuda = dev;
        }
        let mut mr = ptr::null_mut();
        // SAFETY: the header's fi_mr_regattr: domain->mr->regattr; `attr`
        // and `iov` outlive the call, the memory the caller's contract.
        let ret = unsafe {
            let op = (*(*self.ptr).mr).regattr.expect("fi_ops_mr.regattr");
            op(&mut (*self.ptr).fid, &attr, 0, &mut mr)
        };
        check("fi_mr_regattr", ret as i64)?;
        Ok(Mr {
            ptr: mr,
            _domain: self.clone(),
        })
    }
}
closes!(Domain);

impl Av {
    pub(crate) fn open(domain: &Arc<Domain>, count: usize) -> Result<Arc<Av>, FiError> {
        let mut attr = sys::fi_av_attr {
            type_: sys::FI_AV_TABLE,
            count,
            ..Default::default()
        };
        let mut av = ptr::null_mut();
        // SAFETY: the header's fi_av_open: domain->ops->av_open.
        let ret = unsafe {
            let op = (*(*domain.ptr).ops).av_open.expect("fi_ops_domain.av_open");
            op(domain.ptr, &mut attr, &mut av, ptr::null_mut())
        };
        check("fi_av_open", ret as i64)?;
        Ok(Arc::new(Av {
            ptr: av,
            _domain: domain.clone(),
        }))
    }
    fn fid(&self) -> *mut sys::fid {
        // SAFETY: as for Fabric.
        unsafe { &mut (*self.ptr).fid }
    }
    fn fabric(&self) -> &Fabric {
        &self._domain._fabric
    }

    /// `fi_av_insert` of one raw endpoint name; its fabric address.
    pub(crate) fn insert(&self, name: &[u8]) -> Result<sys::fi_addr_t, FiError> {
        let mut addr = ADDR_NOTAVAIL;
        // SAFETY: the header's fi_av_insert: av->ops->insert, one address
        // of the provider's own format (the length was checked against
        // ours by the caller).
        let ret = unsafe {
            let op = (*(*self.ptr).ops).insert.expect("fi_ops_av.insert");
            op(
                self.ptr,
                name.as_ptr().cast(),
                1,
                &mut addr,
                0,
                ptr::null_mut(),
            )
        };
        if ret != 1 || addr == ADDR_NOTAVAIL {
            return Err(FiError::new(
                "fi_av_insert",
                if ret < 0 {
                    ret as i64
                } else {
                    -(libc::EINVAL as i64)
                },
            ));
        }
        Ok(addr)
    }
}
closes!(Av);

impl Cq {
    pub(crate) fn open(domain: &Arc<Domain>, size: usize) -> Result<Arc<Cq>, FiError> {
        let mut attr = sys::fi_cq_attr {
            size,
            format: sys::FI_CQ_FORMAT_DATA,
            wait_obj: sys::FI_WAIT_NONE,
            ..Default::default()
        };
        let mut cq = ptr::null_mut();
        // SAFETY: the header's fi_cq_open: domain->ops->cq_open.
        let ret = unsafe {
            let op = (*(*domain.ptr).ops).cq_open.expect("fi_ops_domain.cq_open");
            op(domain.ptr, &mut attr, &mut cq, ptr::null_mut())
        };
        check("fi_cq_open", ret as i64)?;
        Ok(Arc::new(Cq {
            ptr: cq,
            _domain: domain.clone(),
        }))
    }
    fn fid(&self) -> *mut sys::fid {
        // SAFETY: as for Fabric.
        unsafe { &mut (*self.ptr).fid }
    }
    fn fabric(&self) -> &Fabric {
        &self._domain._fabric
    }

    /// `fi_cq_read`: up to `buf.len()` completions. `Ok(0)` when there
    /// are none; `Err` with `FI_EAVAIL` when an error completion waits for
    /// [`read_err`](Self::read_err).
    pub(crate) fn read(&self, buf: &mut [sys::fi_cq_data_entry]) -> Result<usize, FiError> {
        // SAFETY: reads the live queue's ops table.
        let op = unsafe { (*(*self.ptr).ops).read.expect("fi_ops_cq.read") };
        let (cq, entries, n) = (self.ptr, buf.as_mut_ptr(), buf.len());
        // SAFETY: the header's fi_cq_read, into `n` entries of the format
        // the queue was opened with.
        let ret = guarded(self.fabric(), "fi_cq_read", || unsafe {
            op(cq, entries.cast(), n)
        })?;
        match ret {
            r if r >= 0 => Ok(r as usize),
            r if r == -(sys::FI_EAGAIN as isize) => Ok(0),
            r => Err(FiError::new("fi_cq_read", r as i64)),
        }
    }

    /// `fi_cq_readerr`: the next error completion, if any.
    pub(crate) fn read_err(&self) -> Option<sys::fi_cq_err_entry> {
        let mut e = sys::fi_cq_err_entry::default();
        // SAFETY: reads the live queue's ops table.
        let op = unsafe { (*(*self.ptr).ops).readerr.expect("fi_ops_cq.readerr") };
        let (cq, entry) = (self.ptr, &mut e as *mut sys::fi_cq_err_entry);
        // SAFETY: the header's fi_cq_readerr, into the one entry `e`.
        let ret = guarded(self.fabric(), "fi_cq_readerr", || unsafe {
            op(cq, entry, 0)
        });
        matches!(ret, Ok(n) if n > 0).then_some(e)
    }

    /// The provider's text for an error completion.
    pub(crate) fn err_text(&self, e: &sys::fi_cq_err_entry) -> String {
        let mut buf = [0 as libc::c_char; 256];
        // SAFETY: the header's fi_cq_strerror: cq->ops->strerror, into `buf`.
        let p = unsafe {
            let op = (*(*self.ptr).ops).strerror.expect("fi_ops_cq.strerror");
            op(
                self.ptr,
                e.prov_errno,
                e.err_data,
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        let prov = cstr_field(p);
        format!("{} ({prov})", strerror(e.err))
    }
}
closes!(Cq);

impl Ep {
    /// An endpoint of `info`, bound to `av` and to `cq` for both
    /// directions with selective completion, and enabled.
    pub(crate) fn open(
        domain: &Arc<Domain>,
        info: &Info,
        av: &Arc<Av>,
        cq: &Arc<Cq>,
    ) -> Result<Ep, FiError> {
        let mut p = ptr::null_mut();
        // SAFETY: the header's fi_endpoint: domain->ops->endpoint.
        let ret = unsafe {
            let op = (*(*domain.ptr).ops)
                .endpoint
                .expect("fi_ops_domain.endpoint");
            op(domain.ptr, info.0, &mut p, ptr::null_mut())
        };
        check("fi_endpoint", ret as i64)?;
        let ep = Ep {
            ptr: p,
            _av: av.clone(),
            _cq: cq.clone(),
        };
        ep.bind(av.fid(), 0)?;
        ep.bind(
            cq.fid(),
            sys::FI_TRANSMIT as u64 | sys::FI_RECV as u64 | sys::FI_SELECTIVE_COMPLETION,
        )?;
        // SAFETY: the header's fi_enable: ep->fid.ops->control(FI_ENABLE).
        let ret = unsafe {
            let op = (*(*p).fid.ops).control.expect("fi_ops.control");
            op(&mut (*p).fid, sys::FI_ENABLE as i32, ptr::null_mut())
        };
        check("fi_enable", ret as i64)?;
        Ok(ep)
    }

    fn bind(&self, what: *mut sys::fid, flags: u64) -> Result<(), FiError> {
        // SAFETY: the header's fi_ep_bind: ep->fid.ops->bind.
        let ret = unsafe {
            let op = (*(*self.ptr).fid.ops).bind.expect("fi_ops.bind");
            op(&mut (*self.ptr).fid, what, flags)
        };
        check("fi_ep_bind", ret as i64)
    }

    fn fid(&self) -> *mut sys::fid {
        // SAFETY: as for Fabric.
        unsafe { &mut (*self.ptr).fid }
    }
    fn fabric(&self) -> &Fabric {
        &self._cq._domain._fabric
    }

    /// `fi_getname`: this endpoint's raw address.
    pub(crate) fn name(&self) -> Result<Vec<u8>, FiError> {
        let mut buf = vec![0u8; 256];
        let mut len = buf.len();
        // SAFETY: the header's fi_getname: ep->cm->getname, into `buf`.
        let ret = unsafe {
            let op = (*(*self.ptr).cm).getname.expect("fi_ops_cm.getname");
            op(self.fid(), buf.as_mut_ptr().cast(), &mut len)
        };
        check("fi_getname", ret as i64)?;
        buf.truncate(len);
        Ok(buf)
    }

    /// `fi_writemsg`: one RMA write described by `msg`.
    ///
    /// # Safety
    /// `msg` names registered memory that stays valid and unchanged until
    /// the write completes (or, with `FI_INJECT`, until this returns), and
    /// a context valid until its completion is read.
    pub(crate) unsafe fn write_msg(
        &self,
        msg: &sys::fi_msg_rma,
        flags: u64,
    ) -> Result<(), FiError> {
        // SAFETY: reads the live endpoint's ops table.
        let op = unsafe { (*(*self.ptr).rma).writemsg.expect("fi_ops_rma.writemsg") };
        let (ep, msg) = (self.ptr, msg as *const sys::fi_msg_rma);
        // SAFETY: the header's fi_writemsg; the rest is the caller's contract.
        let ret = guarded(self.fabric(), "fi_writemsg", || unsafe {
            op(ep, msg, flags)
        })?;
        check("fi_writemsg", ret as i64)
    }

    /// `fi_inject_writedata` (with `data`, as remote CQ data) or
    /// `fi_inject_write`: one RMA write of `len` bytes at `buf` to `addr`
    /// (under `key`) at `dest`, copied before this returns and asking no
    /// completion. The provider's inject entries skip what `fi_writemsg`
    /// does for any write (over libfabric's shm: its completion queue's
    /// lock, the source's memory kind, the choice of protocol, the
    /// completion's decision): over libfabric 1.17's shm, 324 instructions
    /// a call against about 430 for the same write through `fi_writemsg`
    /// (callgrind), as fabtests' ping-pong posts. `None` where the
    /// provider has no such entry (`-FI_ENOSYS` or none in its table): the
    /// caller posts with [`write_msg`](Self::write_msg).
    ///
    /// # Safety
    /// `buf..buf+len` is readable; `len` is at most the endpoint's inject
    /// size.
    pub(crate) unsafe fn inject_write(
        &self,
        (buf, len): (*const u8, usize),
        data: Option<u64>,
        dest: sys::fi_addr_t,
        (addr, key): (u64, u64),
    ) -> Option<Result<(), FiError>> {
        let ep = self.ptr;
        let buf = buf.cast::<libc::c_void>();
        let (name, ret) = match data {
            Some(data) => {
                let name = "fi_inject_writedata";
                // SAFETY: reads the live endpoint's ops table.
                let op = unsafe { (*(*self.ptr).rma).injectdata }?;
                // SAFETY: the header's fi_inject_writedata; the rest is the caller's contract.
                let ret = guarded(self.fabric(), name, || unsafe {
                    op(ep, buf, len, data, dest, addr, key)
                });
                (name, ret)
            }
            None => {
                let name = "fi_inject_write";
                // SAFETY: reads the live endpoint's ops table.
                let op = unsafe { (*(*self.ptr).rma).inject }?;
                // SAFETY: the header's fi_inject_write; the rest is the caller's contract.
                let ret = guarded(self.fabric(), name, || unsafe {
                    op(ep, buf, len, dest, addr, key)
                });
                (name, ret)
            }
        };
        match ret {
            Ok(ret) if ret == -(sys::FI_ENOSYS as isize) => None,
            ret => Some(ret.and_then(|ret| check(name, ret as i64))),
        }
    }

    /// `fi_sendmsg`: one message of the bytes `msg` names.
    ///
    /// # Safety
    /// As for [`Ep::write_msg`] (with `FI_INJECT` the bytes are copied
    /// before this returns).
    pub(crate) unsafe fn send_msg(&self, msg: &sys::fi_msg, flags: u64) -> Result<(), FiError> {
        // SAFETY: reads the live endpoint's ops table.
        let op = unsafe { (*(*self.ptr).msg).sendmsg.expect("fi_ops_msg.sendmsg") };
        let (ep, msg) = (self.ptr, msg as *const sys::fi_msg);
        // SAFETY: the header's fi_sendmsg; the rest is the caller's contract.
        let ret = guarded(self.fabric(), "fi_sendmsg", || unsafe {
            op(ep, msg, flags)
        })?;
        check("fi_sendmsg", ret as i64)
    }

    /// `fi_recvmsg`: posts the buffer `msg` names for one message.
    ///
    /// # Safety
    /// The buffer and the context stay valid, and the buffer is not read,
    /// until the receive's completion is read.
    pub(crate) unsafe fn recv_msg(&self, msg: &sys::fi_msg, flags: u64) -> Result<(), FiError> {
        // SAFETY: reads the live endpoint's ops table.
        let op = unsafe { (*(*self.ptr).msg).recvmsg.expect("fi_ops_msg.recvmsg") };
        let (ep, msg) = (self.ptr, msg as *const sys::fi_msg);
        // SAFETY: the header's fi_recvmsg; the rest is the caller's contract.
        let ret = guarded(self.fabric(), "fi_recvmsg", || unsafe {
            op(ep, msg, flags)
        })?;
        check("fi_recvmsg", ret as i64)
    }
}
closes!(Ep);

impl Mr {
    fn fid(&self) -> *mut sys::fid {
        // SAFETY: as for Fabric.
        unsafe { &mut (*self.ptr).fid }
    }
    fn fabric(&self) -> &Fabric {
        &self._domain._fabric
    }
    /// The remote key (`fi_mr_key`).
    pub(crate) fn key(&self) -> u64 {
        // SAFETY: a live registration; `key` is plain data.
        unsafe { (*self.ptr).key }
    }
    /// The local descriptor (`fi_mr_desc`).
    pub(crate) fn desc(&self) -> *mut libc::c_void {
        // SAFETY: as above.
        unsafe { (*self.ptr).mem_desc }
    }
}
closes!(Mr);
