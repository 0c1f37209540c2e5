//! A small safe layer over libibverbs (through `rdma-sys`): owned handles
//! that free their object in `Drop`, children holding their parents alive
//! through `Arc`, and `unsafe` posting whose contract is spelled out.

use std::ffi::CStr;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::*;

/// A verbs failure, saying what was tried.
#[derive(Debug, thiserror::Error)]
pub enum IbError {
    #[error("no RDMA device found (ibv_get_device_list returned none; load a NIC driver or rdma_rxe and create a link)")]
    NoDevice,
    #[error("RDMA device {wanted:?} not found; devices: {available}")]
    DeviceNotFound { wanted: String, available: String },
    #[error("{device}: no active port (ports: {ports})")]
    NoActivePort { device: String, ports: String },
    #[error("{device} port {port}: no usable GID (tried: {tried})")]
    NoGid {
        device: String,
        port: u8,
        tried: String,
    },
    #[error("{device} port {port} QP {qpn}: transition {from} -> {to} refused: {source}")]
    Transition {
        device: String,
        port: u8,
        qpn: u32,
        from: &'static str,
        to: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} on {device}: {source}")]
    Call {
        op: String,
        device: String,
        #[source]
        source: std::io::Error,
    },
}

/// `IBV_LINK_LAYER_INFINIBAND` from verbs.h (an anonymous enum bindgen skips).
const LINK_LAYER_INFINIBAND: u8 = 1;

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// An open device.
#[derive(Debug)]
pub struct Context {
    ctx: NonNull<ibv_context>,
    pub name: String,
}

// SAFETY: libibverbs contexts may be used from any thread.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

/// The names of the RDMA devices present.
pub fn device_names() -> Vec<String> {
    let mut n = 0;
    // SAFETY: returns an array of n device pointers, freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Vec::new();
    }
    let names = (0..n as usize)
        .map(|i| {
            // SAFETY: i < n entries, each a valid device with a NUL-terminated name.
            unsafe { CStr::from_ptr(ibv_get_device_name(*list.add(i))) }
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // SAFETY: the list came from ibv_get_device_list.
    unsafe { ibv_free_device_list(list) };
    names
}

impl Context {
    /// Opens `wanted`, or the first device when `None`.
    pub fn open(wanted: Option<&str>) -> Result<Arc<Self>, IbError> {
        let mut n = 0;
        // SAFETY: as in device_names.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() || n == 0 {
            if !list.is_null() {
                // SAFETY: from ibv_get_device_list.
                unsafe { ibv_free_device_list(list) };
            }
            return Err(IbError::NoDevice);
        }
        let mut names = Vec::new();
        let mut chosen = None;
        for i in 0..n as usize {
            // SAFETY: i < n.
            let dev = unsafe { *list.add(i) };
            // SAFETY: a valid device has a NUL-terminated name.
            let name = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }
                .to_string_lossy()
                .into_owned();
            if chosen.is_none() && wanted.is_none_or(|w| w == name) {
                chosen = Some((dev, name.clone()));
            }
            names.push(name);
        }
        let result = match chosen {
            None => Err(IbError::DeviceNotFound {
                wanted: wanted.unwrap_or_default().to_string(),
                available: names.join(", "),
            }),
            Some((dev, name)) => {
                // SAFETY: dev is from the live list.
                let ctx = unsafe { ibv_open_device(dev) };
                NonNull::new(ctx)
                    .map(|ctx| {
                        Arc::new(Context {
                            ctx,
                            name: name.clone(),
                        })
                    })
                    .ok_or_else(|| IbError::Call {
                        op: "ibv_open_device".into(),
                        device: name,
                        source: errno(),
                    })
            }
        };
        // SAFETY: from ibv_get_device_list; the opened context does not need it.
        unsafe { ibv_free_device_list(list) };
        result
    }

    pub fn as_ptr(&self) -> *mut ibv_context {
        self.ctx.as_ptr()
    }

    fn call(&self, op: &str) -> IbError {
        IbError::Call {
            op: op.into(),
            device: self.name.clone(),
            source: errno(),
        }
    }

    pub fn query_port(&self, port: u8) -> Result<ibv_port_attr, IbError> {
        // SAFETY: a zeroed plain-data struct is a valid out-parameter.
        let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out-parameter.
        let rc = unsafe { ___ibv_query_port(self.as_ptr(), port, &mut attr) };
        if rc != 0 {
            return Err(self.call(&format!("ibv_query_port({port})")));
        }
        Ok(attr)
    }

    /// `wanted`, or the first active port.
    pub fn choose_port(&self, wanted: Option<u8>) -> Result<(u8, ibv_port_attr), IbError> {
        // SAFETY: zeroed out-parameter; valid context.
        let mut dev: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { ibv_query_device(self.as_ptr(), &mut dev) } != 0 {
            return Err(self.call("ibv_query_device"));
        }
        let mut seen = Vec::new();
        for port in 1..=dev.phys_port_cnt {
            if wanted.is_some_and(|w| w != port) {
                continue;
            }
            let attr = self.query_port(port)?;
            if attr.state == ibv_port_state::IBV_PORT_ACTIVE {
                return Ok((port, attr));
            }
            seen.push(format!("{port}: state {}", attr.state));
        }
        Err(IbError::NoActivePort {
            device: self.name.clone(),
            ports: if seen.is_empty() {
                "none matching".into()
            } else {
                seen.join(", ")
            },
        })
    }

    pub fn gid(&self, port: u8, index: u8) -> Result<[u8; 16], IbError> {
        // SAFETY: zeroed out-parameter.
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: valid context and out-parameter.
        if unsafe { ibv_query_gid(self.as_ptr(), port, index as i32, &mut gid) } != 0 {
            return Err(self.call(&format!("ibv_query_gid({port}, {index})")));
        }
        // SAFETY: every bit pattern of the union is a valid byte array.
        Ok(unsafe { gid.raw })
    }

    /// `wanted`, or the first RoCE v2 GID holding an IPv4 address (then
    /// any RoCE v2 GID; index 0 on InfiniBand).
    pub fn choose_gid(
        &self,
        port: u8,
        attr: &ibv_port_attr,
        wanted: Option<u8>,
    ) -> Result<(u8, [u8; 16]), IbError> {
        if let Some(i) = wanted {
            return Ok((i, self.gid(port, i)?));
        }
        if attr.link_layer == LINK_LAYER_INFINIBAND {
            return Ok((0, self.gid(port, 0)?));
        }
        let mut tried = Vec::new();
        let mut fallback = None;
        for i in 0..attr.gid_tbl_len.clamp(0, 255) as u8 {
            let Ok(gid) = self.gid(port, i) else { continue };
            if gid == [0; 16] {
                continue;
            }
            let kind = std::fs::read_to_string(format!(
                "/sys/class/infiniband/{}/ports/{port}/gid_attrs/types/{i}",
                self.name
            ))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown type".into());
            let v4 = gid[..10] == [0; 10] && gid[10..12] == [0xff, 0xff];
            tried.push(format!("{i}={kind}{}", if v4 { " ipv4" } else { "" }));
            if kind.eq_ignore_ascii_case("RoCE v2") {
                if v4 {
                    return Ok((i, gid));
                }
                fallback.get_or_insert((i, gid));
            }
        }
        fallback.ok_or_else(|| IbError::NoGid {
            device: self.name.clone(),
            port,
            tried: if tried.is_empty() {
                "no non-zero GIDs".into()
            } else {
                tried.join(", ")
            },
        })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every child holds an Arc of this context, so none is left.
        unsafe { ibv_close_device(self.ctx.as_ptr()) };
    }
}

/// A protection domain.
#[derive(Debug)]
pub struct Pd {
    pd: NonNull<ibv_pd>,
    pub ctx: Arc<Context>,
}

// SAFETY: verbs objects may be used from any thread.
unsafe impl Send for Pd {}
// SAFETY: as above.
unsafe impl Sync for Pd {}

impl Pd {
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<Self>, IbError> {
        // SAFETY: valid context.
        let pd = unsafe { ibv_alloc_pd(ctx.as_ptr()) };
        NonNull::new(pd)
            .map(|pd| {
                Arc::new(Pd {
                    pd,
                    ctx: ctx.clone(),
                })
            })
            .ok_or_else(|| ctx.call("ibv_alloc_pd"))
    }
    pub fn as_ptr(&self) -> *mut ibv_pd {
        self.pd.as_ptr()
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: children hold Arcs of the PD, so none is left.
        unsafe { ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// A registered memory region.
#[derive(Debug)]
pub struct Mr {
    mr: NonNull<ibv_mr>,
    _pd: Arc<Pd>,
}

// SAFETY: as for Pd.
unsafe impl Send for Mr {}
// SAFETY: as for Pd.
unsafe impl Sync for Mr {}

impl Mr {
    /// Registers `addr..addr+len`.
    ///
    /// # Safety
    /// The memory must stay valid until the Mr is dropped.
    pub unsafe fn register(
        pd: &Arc<Pd>,
        addr: *mut u8,
        len: usize,
        remote_write: bool,
    ) -> Result<Self, IbError> {
        let mut access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        if remote_write {
            access |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
        // SAFETY: the caller keeps the memory valid; the PD is live.
        let mr = unsafe { ibv_reg_mr(pd.as_ptr(), addr.cast(), len.max(1), access as i32) };
        NonNull::new(mr)
            .map(|mr| Mr {
                mr,
                _pd: pd.clone(),
            })
            .ok_or_else(|| pd.ctx.call(&format!("ibv_reg_mr({len} bytes)")))
    }

    /// Registers GPU memory `iova..iova+len` exported as the dma-buf `fd`.
    ///
    /// # Safety
    /// The device memory must stay allocated until the Mr is dropped.
    #[cfg(feature = "cuda")]
    pub unsafe fn register_dmabuf(
        pd: &Arc<Pd>,
        fd: std::os::fd::OwnedFd,
        iova: u64,
        len: usize,
    ) -> Result<Self, IbError> {
        use std::os::fd::AsRawFd;
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        // SAFETY: a live PD and a dma-buf fd covering [0, len).
        let mr =
            unsafe { ibv_reg_dmabuf_mr(pd.as_ptr(), 0, len, iova, fd.as_raw_fd(), access as i32) };
        // The MR holds its own reference to the dma-buf; our fd may close.
        drop(fd);
        NonNull::new(mr)
            .map(|mr| Mr {
                mr,
                _pd: pd.clone(),
            })
            .ok_or_else(|| pd.ctx.call(&format!("ibv_reg_dmabuf_mr({len} bytes)")))
    }

    pub fn lkey(&self) -> u32 {
        // SAFETY: the MR is live.
        unsafe { self.mr.as_ref().lkey }
    }
    pub fn rkey(&self) -> u32 {
        // SAFETY: the MR is live.
        unsafe { self.mr.as_ref().rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: owned MR; in-flight work requests keep its memory's owner alive.
        unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// A completion queue.
#[derive(Debug)]
pub struct Cq {
    cq: NonNull<ibv_cq>,
    _ctx: Arc<Context>,
}

// SAFETY: as for Pd.
unsafe impl Send for Cq {}
// SAFETY: as for Pd.
unsafe impl Sync for Cq {}

impl Cq {
    pub fn new(ctx: &Arc<Context>, depth: i32) -> Result<Arc<Self>, IbError> {
        // SAFETY: valid context; no channel, no completion vector.
        let cq = unsafe {
            ibv_create_cq(
                ctx.as_ptr(),
                depth,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        NonNull::new(cq)
            .map(|cq| {
                Arc::new(Cq {
                    cq,
                    _ctx: ctx.clone(),
                })
            })
            .ok_or_else(|| ctx.call(&format!("ibv_create_cq({depth})")))
    }
    pub fn as_ptr(&self) -> *mut ibv_cq {
        self.cq.as_ptr()
    }

    /// Polls up to `out.len()` completions; returns how many.
    pub fn poll(&self, out: &mut [ibv_wc]) -> Result<usize, IbError> {
        // SAFETY: `out` has room for out.len() entries.
        let n = unsafe { ibv_poll_cq(self.cq.as_ptr(), out.len() as i32, out.as_mut_ptr()) };
        if n < 0 {
            return Err(self._ctx.call("ibv_poll_cq"));
        }
        Ok(n as usize)
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: QPs using this CQ hold Arcs of it, so none is left.
        unsafe { ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

/// A shared receive queue of zero-SGE receives: writes with immediate
/// consume one each, carrying no data of their own.
#[derive(Debug)]
pub struct Srq {
    srq: NonNull<ibv_srq>,
    pd: Arc<Pd>,
}

// SAFETY: as for Pd.
unsafe impl Send for Srq {}
// SAFETY: as for Pd.
unsafe impl Sync for Srq {}

impl Srq {
    pub fn new(pd: &Arc<Pd>, depth: u32) -> Result<Arc<Self>, IbError> {
        // SAFETY: zeroed plain-data struct.
        let mut attr: ibv_srq_init_attr = unsafe { std::mem::zeroed() };
        attr.attr.max_wr = depth;
        attr.attr.max_sge = 1;
        // SAFETY: valid PD and attributes.
        let srq = unsafe { ibv_create_srq(pd.as_ptr(), &mut attr) };
        NonNull::new(srq)
            .map(|srq| {
                Arc::new(Srq {
                    srq,
                    pd: pd.clone(),
                })
            })
            .ok_or_else(|| pd.ctx.call(&format!("ibv_create_srq({depth})")))
    }
    pub fn as_ptr(&self) -> *mut ibv_srq {
        self.srq.as_ptr()
    }

    /// Posts `n` zero-SGE receives in one call.
    pub fn post_receives(&self, n: usize) -> Result<(), IbError> {
        if n == 0 {
            return Ok(());
        }
        // SAFETY: zeroed plain-data structs; a null sg_list with num_sge 0 is valid.
        let mut wrs: Vec<ibv_recv_wr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for i in 0..n - 1 {
            let next: *mut ibv_recv_wr = &mut wrs[i + 1];
            wrs[i].next = next;
        }
        let mut bad = std::ptr::null_mut();
        // SAFETY: a well-formed linked list of receives, alive during the call.
        let rc = unsafe { ibv_post_srq_recv(self.srq.as_ptr(), wrs.as_mut_ptr(), &mut bad) };
        if rc != 0 {
            return Err(IbError::Call {
                op: format!("ibv_post_srq_recv({n})"),
                device: self.pd.ctx.name.clone(),
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
        Ok(())
    }
}

impl Drop for Srq {
    fn drop(&mut self) {
        // SAFETY: QPs using this SRQ hold Arcs of it.
        unsafe { ibv_destroy_srq(self.srq.as_ptr()) };
    }
}

/// Where an RC queue pair connects to, and how.
#[derive(Debug, Clone, Copy)]
pub struct PathSettings {
    pub port: u8,
    pub gid_index: u8,
    pub remote_gid: [u8; 16],
    pub remote_lid: u16,
    pub remote_qpn: u32,
    pub mtu: u32,
    pub traffic_class: u8,
    pub service_level: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
}

/// A reliable-connected queue pair.
#[derive(Debug)]
pub struct Qp {
    qp: NonNull<ibv_qp>,
    pd: Arc<Pd>,
    _send_cq: Arc<Cq>,
    _recv_cq: Arc<Cq>,
    _srq: Arc<Srq>,
    pub max_inline: u32,
}

// SAFETY: as for Pd.
unsafe impl Send for Qp {}
// SAFETY: as for Pd.
unsafe impl Sync for Qp {}

impl Qp {
    pub fn new(
        pd: &Arc<Pd>,
        send_cq: &Arc<Cq>,
        recv_cq: &Arc<Cq>,
        srq: &Arc<Srq>,
        sq_depth: u32,
        max_inline: u32,
    ) -> Result<Self, IbError> {
        // SAFETY: zeroed plain-data struct.
        let mut attr: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = send_cq.as_ptr();
        attr.recv_cq = recv_cq.as_ptr();
        attr.srq = srq.as_ptr();
        attr.qp_type = ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 0;
        attr.cap.max_send_wr = sq_depth;
        attr.cap.max_send_sge = 1;
        attr.cap.max_inline_data = max_inline;
        // SAFETY: valid PD and attributes.
        let qp = unsafe { ibv_create_qp(pd.as_ptr(), &mut attr) };
        let qp = NonNull::new(qp).ok_or_else(|| pd.ctx.call("ibv_create_qp(RC)"))?;
        Ok(Qp {
            qp,
            pd: pd.clone(),
            _send_cq: send_cq.clone(),
            _recv_cq: recv_cq.clone(),
            _srq: srq.clone(),
            max_inline: attr.cap.max_inline_data,
        })
    }

    pub fn num(&self) -> u32 {
        // SAFETY: live QP.
        unsafe { self.qp.as_ref().qp_num }
    }

    fn modify(
        &self,
        attr: &mut ibv_qp_attr,
        mask: u32,
        port: u8,
        from: &'static str,
        to: &'static str,
    ) -> Result<(), IbError> {
        // SAFETY: live QP; attr and mask describe a valid transition.
        let rc = unsafe { ibv_modify_qp(self.qp.as_ptr(), attr, mask as i32) };
        if rc != 0 {
            return Err(IbError::Transition {
                device: self.pd.ctx.name.clone(),
                port,
                qpn: self.num(),
                from,
                to,
                source: std::io::Error::from_raw_os_error(rc),
            });
        }
        Ok(())
    }

    /// RESET -> INIT -> RTR -> RTS toward `path`.
    pub fn connect(&self, path: &PathSettings) -> Result<(), IbError> {
        use ibv_qp_attr_mask as m;
        // SAFETY: zeroed plain-data struct.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = path.port;
        a.qp_access_flags = ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            | ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        self.modify(
            &mut a,
            (m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS).0,
            path.port,
            "RESET",
            "INIT",
        )?;

        // SAFETY: zeroed plain-data struct.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = mtu_enum(path.mtu);
        a.dest_qp_num = path.remote_qpn;
        a.rq_psn = 0;
        a.max_dest_rd_atomic = 1;
        a.min_rnr_timer = 12;
        a.ah_attr.is_global = 1;
        a.ah_attr.dlid = path.remote_lid;
        a.ah_attr.sl = path.service_level;
        a.ah_attr.port_num = path.port;
        a.ah_attr.grh.dgid = ibv_gid {
            raw: path.remote_gid,
        };
        a.ah_attr.grh.sgid_index = path.gid_index;
        a.ah_attr.grh.hop_limit = 64;
        a.ah_attr.grh.traffic_class = path.traffic_class;
        let mask = m::IBV_QP_STATE
            | m::IBV_QP_AV
            | m::IBV_QP_PATH_MTU
            | m::IBV_QP_DEST_QPN
            | m::IBV_QP_RQ_PSN
            | m::IBV_QP_MAX_DEST_RD_ATOMIC
            | m::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut a, mask.0, path.port, "INIT", "RTR")?;

        // SAFETY: zeroed plain-data struct.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.timeout = path.timeout;
        a.retry_cnt = path.retry_cnt;
        a.rnr_retry = path.rnr_retry;
        a.sq_psn = 0;
        a.max_rd_atomic = 1;
        let mask = m::IBV_QP_STATE
            | m::IBV_QP_TIMEOUT
            | m::IBV_QP_RETRY_CNT
            | m::IBV_QP_RNR_RETRY
            | m::IBV_QP_SQ_PSN
            | m::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut a, mask.0, path.port, "RTR", "RTS")
    }

    /// Posts a linked list of work requests with one doorbell.
    ///
    /// # Safety
    /// `wrs` must be a well-formed linked list whose SGEs name memory
    /// registered in this QP's PD, and that memory must stay valid and
    /// unchanged until the requests complete (or, unsignalled, until a later
    /// signalled request on this QP completes).
    pub unsafe fn post_send(&self, wrs: *mut ibv_send_wr) -> Result<(), std::io::Error> {
        let mut bad = std::ptr::null_mut();
        // SAFETY: forwarded contract.
        let rc = unsafe { ibv_post_send(self.qp.as_ptr(), wrs, &mut bad) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: owned QP.
        unsafe { ibv_destroy_qp(self.qp.as_ptr()) };
    }
}

/// The verbs enum for a path MTU in bytes (rounded down to a valid one).
pub fn mtu_enum(bytes: u32) -> ibv_mtu::Type {
    match bytes {
        b if b >= 4096 => ibv_mtu::IBV_MTU_4096,
        b if b >= 2048 => ibv_mtu::IBV_MTU_2048,
        b if b >= 1024 => ibv_mtu::IBV_MTU_1024,
        b if b >= 512 => ibv_mtu::IBV_MTU_512,
        _ => ibv_mtu::IBV_MTU_256,
    }
}

/// Bytes of a verbs MTU enum.
pub fn mtu_bytes(mtu: ibv_mtu::Type) -> u32 {
    256 << (mtu.saturating_sub(1)).min(4)
}

/// `ibv_wc_status_str` as a Rust string.
pub fn status_str(status: ibv_wc_status::Type) -> String {
    // SAFETY: returns a static NUL-terminated string for any value.
    unsafe { CStr::from_ptr(ibv_wc_status_str(status)) }
        .to_string_lossy()
        .into_owned()
}
