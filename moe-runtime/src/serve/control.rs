//! The control channel between the serving front end (the engine) and the
//! workers: one TCP connection per worker, JSON lines. The engine connects
//! nothing; each worker dials `MOE_CONTROL_ADDR` and says hello with its
//! role and rank. Activations never travel here (only token ids, requests,
//! cancellations and group changes): they cross m2n.
//!
//! Engine to worker ([`ToWorker`]): `submit` (a sequence joins this
//! attention worker's batch at the next step), `cancel`, `step` (run one
//! step of the group: every attention worker gets one, the engine sends
//! them together), `reform` (the group lost a member: join the new group
//! with this id, keeping weights and sequences) and `shutdown` (run the
//! group's last, idle step and exit).
//!
//! Worker to engine ([`FromWorker`]): `hello`, `stepped` (the tokens made
//! and the per-micro-batch timings), `rejected` (a request it refused),
//! `broken` (its group failed under it, naming the peer m2n blamed if it
//! did; it waits for `reform`), `reformed` (it joined the new group) and
//! `error` (something it cannot recover from; then it exits).
//!
//! A worker whose control channel closes exits: that is how a worker the
//! engine gave up on (hung past the peer timeout, then replaced) is fenced
//! out even if it wakes later; its old group is gone too, so nothing it
//! sends there is received.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use m2n::{Communicator, Role, UniqueId};
use serde::{Deserialize, Serialize};

use crate::model::weights::ExpertWeights;
use crate::model::RuntimeError;
use crate::worker::attention::{AttentionWorker, MbTiming, PromptLogprob, Request, SeqId, Token};
use crate::worker::expert::ExpertWorker;
use crate::worker::Deployment;

/// The environment variable carrying the engine's control address.
pub const CONTROL_ADDR_ENV: &str = "MOE_CONTROL_ADDR";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToWorker {
    Submit {
        id: SeqId,
        request: Request,
    },
    Cancel {
        id: SeqId,
    },
    Step,
    /// Join the group (re-)formed under this unique id; `deployment` is
    /// the server's (attention, experts, micro-batches, rows per
    /// micro-batch), which a worker started elsewhere must share.
    Reform {
        uid: String,
        #[serde(default)]
        deployment: [usize; 4],
    },
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromWorker {
    Hello {
        /// `attention` or `expert`.
        #[serde(default = "attention_role")]
        role: String,
        rank: usize,
        /// Its process id (on its host).
        #[serde(default)]
        pid: u32,
        /// The group's secret (`MOE_SERVE_SECRET`), compared in constant
        /// time: only workers that know it are taken.
        #[serde(default)]
        secret: String,
        /// It waits to take over its slot when the worker there is lost.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        standby: bool,
    },
    Stepped {
        tokens: Vec<Token>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        prompt_logprobs: Vec<PromptLogprob>,
        timings: Vec<MbTiming>,
        rows: usize,
        wall_ns: u64,
        group_active: bool,
    },
    /// A request this worker refused (it never joined the batch).
    Rejected {
        id: SeqId,
        message: String,
    },
    /// The group failed under this worker; it waits for `reform`.
    Broken {
        message: String,
        /// The peer m2n named (`expert 1`), if it named one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
    },
    /// It joined the re-formed group.
    Reformed,
    Error {
        message: String,
    },
}

fn attention_role() -> String {
    Role::Attention.name().to_string()
}

fn send(stream: &mut TcpStream, msg: &FromWorker) -> Result<(), RuntimeError> {
    let mut line = serde_json::to_string(msg).expect("serialisable");
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| RuntimeError::Io(format!("control channel: {e}")))
}

/// Whether `e` is the group failing (a peer lost, hung or misbehaving; a
/// timeout inside a round), which a new group can recover from, rather
/// than this worker's own fault.
fn group_failure(e: &RuntimeError) -> Option<FromWorker> {
    let peer = match e {
        RuntimeError::M2n(m) => m.peer().map(|p| p.to_string()),
        RuntimeError::Message { peer, .. } => Some(peer.clone()),
        _ => return None,
    };
    Some(FromWorker::Broken {
        message: e.to_string(),
        peer,
    })
}

/// The environment variable carrying the group's secret (its workers
/// present it in their hello).
pub const SECRET_ENV: &str = "MOE_SERVE_SECRET";

/// How long a worker keeps dialing a server that is not listening yet.
const DIAL_PATIENCE: Duration = Duration::from_secs(60);

/// How a worker reaches its engine.
#[derive(Debug, Clone)]
pub struct Dial {
    /// The engine's control address (`HOST:PORT`).
    pub addr: String,
    /// The group's secret.
    pub secret: String,
    /// Wait as a standby for this slot instead of filling it.
    pub standby: bool,
    /// This worker's deployment: the engine's must be the same.
    pub deploy: Deployment,
}

/// A deployment as a `reform` carries it.
pub fn deployment_words(d: &Deployment) -> [usize; 4] {
    [d.attention, d.experts, d.microbatches, d.max_tokens]
}

/// Dials the engine and says hello.
fn dial(d: &Dial, role: Role, rank: usize) -> Result<TcpStream, RuntimeError> {
    let io = |e: std::io::Error| RuntimeError::Io(format!("control channel {}: {e}", d.addr));
    // A worker started by hand may come up before its server: it keeps
    // dialing for a minute.
    let t0 = std::time::Instant::now();
    let mut stream = loop {
        match TcpStream::connect(&d.addr) {
            Ok(s) => break s,
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && t0.elapsed() < DIAL_PATIENCE =>
            {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(e) => return Err(io(e)),
        }
    };
    stream.set_nodelay(true).map_err(io)?;
    send(
        &mut stream,
        &FromWorker::Hello {
            role: role.name().to_string(),
            rank,
            pid: std::process::id(),
            secret: d.secret.clone(),
            standby: d.standby,
        },
    )?;
    Ok(stream)
}

/// Reads the next command; `Ok(None)` when the read timed out (with a
/// read timeout set) and nothing is pending.
fn next_command(
    reader: &mut BufReader<TcpStream>,
    line: &mut String,
) -> Result<Option<ToWorker>, RuntimeError> {
    match reader.read_line(line) {
        Ok(0) => Err(RuntimeError::Io(
            "the engine closed the control channel".into(),
        )),
        Ok(_) if line.ends_with('\n') => {
            let cmd = serde_json::from_str(line.trim_end()).map_err(|e| {
                RuntimeError::Io(format!("control channel: bad command {line:?}: {e}"))
            });
            line.clear();
            cmd.map(Some)
        }
        Ok(_) => Ok(None),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(RuntimeError::Io(format!("control channel: {e}"))),
    }
}

/// Joins a group as this worker's role and rank under a unique id (the
/// launcher's first one, then each re-formed group's).
pub type Join<'a> = dyn FnMut(&UniqueId) -> Result<Communicator, RuntimeError> + 'a;

fn parse_uid(uid: &str) -> Result<UniqueId, RuntimeError> {
    uid.parse()
        .map_err(|e: String| RuntimeError::Io(format!("control channel: bad group id: {e}")))
}

/// A group id from a `reform`, once its deployment is checked against
/// this worker's.
fn reform_uid(
    uid: &str,
    deployment: [usize; 4],
    mine: &Deployment,
) -> Result<UniqueId, RuntimeError> {
    let own = deployment_words(mine);
    if deployment != own {
        let show = |w: [usize; 4]| {
            format!(
                "{} attention x {} expert workers, {} micro-batches, {} rows per micro-batch",
                w[0], w[1], w[2], w[3]
            )
        };
        return Err(RuntimeError::Config(format!(
            "the server runs {}; this worker was started for {} (pass the server's --attention, --experts, --microbatches and --max-tokens-per-mb)",
            show(deployment),
            show(own)
        )));
    }
    parse_uid(uid)
}

/// Waits for `reform` (or `shutdown`: `None`); other commands are refused
/// while a worker has no group.
fn await_reform(
    reader: &mut BufReader<TcpStream>,
    line: &mut String,
    mine: &Deployment,
) -> Result<Option<UniqueId>, RuntimeError> {
    // No read timeout while waiting: a standby may wait for days.
    let _ = reader.get_ref().set_read_timeout(None);
    loop {
        match next_command(reader, line)? {
            Some(ToWorker::Reform { uid, deployment }) => {
                return reform_uid(&uid, deployment, mine).map(Some)
            }
            Some(ToWorker::Shutdown) => return Ok(None),
            Some(other) => {
                return Err(RuntimeError::Io(format!(
                    "control channel: {other:?} while this worker has no group"
                )))
            }
            None => {}
        }
    }
}

/// Joins the group under `uid`; a failure of the group (a member lost
/// while it formed) is reported as `broken` and the next `reform` is
/// awaited. `None`: told to shut down.
fn join_until_whole<T>(
    mut uid: UniqueId,
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    line: &mut String,
    mine: &Deployment,
    join: &mut dyn FnMut(&UniqueId) -> Result<T, RuntimeError>,
) -> Result<Option<T>, RuntimeError> {
    loop {
        match join(&uid) {
            Ok(t) => return Ok(Some(t)),
            Err(e @ RuntimeError::M2n(_)) => send(
                stream,
                &FromWorker::Broken {
                    message: format!("joining the re-formed group: {e}"),
                    peer: None,
                },
            )?,
            Err(e) => return Err(e),
        }
        match await_reform(reader, line, mine)? {
            Some(u) => uid = u,
            None => return Ok(None),
        }
    }
}

/// An attention worker under a serving engine: dials `addr` and says
/// hello, joins its first group (`first`, or the id a `reform` brings: a
/// replacement's way in), builds the worker (`build`, with the weights it
/// loaded), then obeys. Between commands it keeps m2n's liveness links
/// alive. When its group fails it reports `broken` and waits to be told
/// the new group's id (`join` joins it). Returns when told to shut down
/// (after the group's last step) or on an error it cannot recover from,
/// which it also reports to the engine.
pub fn serve_attention(
    rank: usize,
    d: &Dial,
    first: Option<&UniqueId>,
    join: &mut Join<'_>,
    build: impl FnOnce(Communicator) -> Result<AttentionWorker, RuntimeError>,
) -> Result<(), RuntimeError> {
    let mut stream = dial(d, Role::Attention, rank)?;
    let result = attention_loop(&mut stream, d, first, join, build);
    if let Err(e) = &result {
        let _ = send(
            &mut stream,
            &FromWorker::Error {
                message: format!("attention {rank}: {e}"),
            },
        );
    }
    result
}

fn attention_loop(
    stream: &mut TcpStream,
    d: &Dial,
    first: Option<&UniqueId>,
    join: &mut Join<'_>,
    build: impl FnOnce(Communicator) -> Result<AttentionWorker, RuntimeError>,
) -> Result<(), RuntimeError> {
    let io = |e: std::io::Error| RuntimeError::Io(format!("control channel: {e}"));
    let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
    let mut line = String::new();
    let (uid, replacement) = match first {
        Some(u) => (u.clone(), false),
        None => match await_reform(&mut reader, &mut line, &d.deploy)? {
            Some(u) => (u, true),
            None => return Ok(()),
        },
    };
    let Some(comm) = join_until_whole(uid, stream, &mut reader, &mut line, &d.deploy, join)? else {
        return Ok(());
    };
    let mut w = build(comm)?;
    if replacement {
        send(stream, &FromWorker::Reformed)?;
    }
    obey(&mut w, stream, &mut reader, &mut line, &d.deploy, join)
}

fn obey(
    w: &mut AttentionWorker,
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    line: &mut String,
    mine: &Deployment,
    join: &mut Join<'_>,
) -> Result<(), RuntimeError> {
    let io = |e: std::io::Error| RuntimeError::Io(format!("control channel: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(io)?;
    // Whether the group failed under us (we wait for `reform`).
    let mut broken = false;
    loop {
        let Some(cmd) = next_command(reader, line)? else {
            if !broken {
                if let Err(e) = w.idle() {
                    broken = true;
                    report_broken(w, stream, e)?;
                }
            }
            continue;
        };
        match cmd {
            ToWorker::Submit { id, request } => {
                if let Err(e) = w.submit(id, request) {
                    send(
                        stream,
                        &FromWorker::Rejected {
                            id,
                            message: e.to_string(),
                        },
                    )?;
                }
            }
            ToWorker::Cancel { id } => {
                w.cancel(id);
            }
            ToWorker::Step if broken => send(
                stream,
                &FromWorker::Broken {
                    message: "the group is being re-formed".into(),
                    peer: None,
                },
            )?,
            ToWorker::Step => match w.step() {
                Ok(r) => send(
                    stream,
                    &FromWorker::Stepped {
                        tokens: r.tokens,
                        prompt_logprobs: r.prompt_logprobs,
                        timings: r.timings,
                        rows: r.rows,
                        wall_ns: r.wall_ns,
                        group_active: r.group_active,
                    },
                )?,
                Err(e) => {
                    broken = true;
                    report_broken(w, stream, e)?;
                }
            },
            ToWorker::Reform { uid, deployment } => {
                let uid = reform_uid(&uid, deployment, mine)?;
                let Some(comm) = join_until_whole(uid, stream, reader, line, mine, join)? else {
                    return Ok(());
                };
                w.reform(comm)?;
                broken = false;
                send(stream, &FromWorker::Reformed)?;
            }
            ToWorker::Shutdown if broken => return Ok(()),
            ToWorker::Shutdown => {
                w.cancel_all();
                while w.step()?.group_active {}
                return Ok(());
            }
        }
    }
}

/// A step or an idle check failed: a group failure is reported as
/// `broken` (after aborting, so the other members fail fast too); any
/// other error ends the worker.
fn report_broken(
    w: &mut AttentionWorker,
    stream: &mut TcpStream,
    e: RuntimeError,
) -> Result<(), RuntimeError> {
    let Some(msg) = group_failure(&e) else {
        return Err(e);
    };
    w.abort();
    send(stream, &msg)
}

/// Builds an expert worker from its weights, joined to a group; when the
/// group does not form, the weights come back with the error.
pub type MakeExpert<'a> = dyn FnMut(
        ExpertWeights,
        &UniqueId,
    ) -> Result<ExpertWorker, (Option<Box<ExpertWeights>>, RuntimeError)>
    + 'a;

/// An expert worker under a serving engine: dials `addr` and says hello,
/// joins its first group (`first`, or the id a `reform` brings) and serves
/// rounds. When its group fails it keeps its weights, reports `broken`,
/// and joins the group re-formed under the id the engine sends; it
/// returns when a group ends normally or the engine says shut down.
pub fn serve_expert(
    weights: ExpertWeights,
    rank: usize,
    first: Option<&UniqueId>,
    d: &Dial,
    make: &mut MakeExpert<'_>,
) -> Result<(), RuntimeError> {
    let mut stream = dial(d, Role::Expert, rank)?;
    let result = expert_loop(weights, first, d, &mut stream, make);
    if let Err(e) = &result {
        let _ = send(
            &mut stream,
            &FromWorker::Error {
                message: format!("expert {rank}: {e}"),
            },
        );
    }
    result
}

fn expert_loop(
    weights: ExpertWeights,
    first: Option<&UniqueId>,
    d: &Dial,
    stream: &mut TcpStream,
    make: &mut MakeExpert<'_>,
) -> Result<(), RuntimeError> {
    let io = |e: std::io::Error| RuntimeError::Io(format!("control channel: {e}"));
    let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
    let mut line = String::new();
    let mut weights = Some(weights);
    let (mut uid, mut tell) = match first {
        Some(u) => (u.clone(), false),
        None => match await_reform(&mut reader, &mut line, &d.deploy)? {
            Some(u) => (u, true),
            None => return Ok(()),
        },
    };
    loop {
        // Join (again, with the weights kept) until a group forms.
        let mut w = loop {
            match make(weights.take().expect("weights are back"), &uid) {
                Ok(w) => break w,
                Err((Some(back), e @ RuntimeError::M2n(_))) => {
                    weights = Some(*back);
                    send(
                        stream,
                        &FromWorker::Broken {
                            message: format!("joining the re-formed group: {e}"),
                            peer: None,
                        },
                    )?;
                    match await_reform(&mut reader, &mut line, &d.deploy)? {
                        Some(u) => uid = u,
                        None => return Ok(()),
                    }
                }
                Err((_, e)) => return Err(e),
            }
        };
        if tell {
            send(stream, &FromWorker::Reformed)?;
        }
        let e = match w.run() {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let Some(msg) = group_failure(&e) else {
            return Err(e);
        };
        w.abort();
        weights = Some(w.into_weights());
        send(stream, &msg)?;
        match await_reform(&mut reader, &mut line, &d.deploy)? {
            Some(u) => uid = u,
            None => return Ok(()),
        }
        tell = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_tagged_json_lines() {
        let c = ToWorker::Cancel { id: 7 };
        let t = serde_json::to_string(&c).unwrap();
        assert_eq!(t, r#"{"op":"cancel","id":7}"#);
        assert_eq!(serde_json::from_str::<ToWorker>(&t).unwrap(), c);
        let s = serde_json::to_string(&ToWorker::Step).unwrap();
        assert_eq!(s, r#"{"op":"step"}"#);
        assert!(serde_json::from_str::<ToWorker>(r#"{"op":"explode"}"#).is_err());
    }
}
