//! The control channel between the serving front end (the engine) and the
//! attention workers: one TCP connection per worker on the loopback
//! interface, JSON lines. The engine connects nothing; each worker dials
//! `MOE_CONTROL_ADDR` and says hello. Activations never travel here (only
//! token ids, requests and cancellations): they cross m2n.
//!
//! Engine to worker ([`ToWorker`]): `submit` (a sequence joins this
//! worker's batch at the next step), `cancel`, `step` (run one step of the
//! group: every worker gets one, the engine sends them together), and
//! `shutdown` (run the group's last, idle step and exit).
//!
//! Worker to engine ([`FromWorker`]): `hello`, `stepped` (the tokens made
//! and the per-micro-batch timings), `error` (then it exits).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::RuntimeError;
use crate::worker::attention::{AttentionWorker, MbTiming, PromptLogprob, Request, SeqId, Token};

/// The environment variable carrying the engine's control address.
pub const CONTROL_ADDR_ENV: &str = "MOE_CONTROL_ADDR";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToWorker {
    Submit { id: SeqId, request: Request },
    Cancel { id: SeqId },
    Step,
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromWorker {
    Hello {
        rank: usize,
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
    Error {
        message: String,
    },
}

fn send(stream: &mut TcpStream, msg: &FromWorker) -> Result<(), RuntimeError> {
    let mut line = serde_json::to_string(msg).expect("serialisable");
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| RuntimeError::Io(format!("control channel: {e}")))
}

/// An attention worker under a serving engine: dials `addr`, then obeys.
/// Between commands it keeps m2n's liveness links alive. Returns when told
/// to shut down (after the group's last step) or on an error, which it
/// also reports to the engine.
pub fn serve_attention(w: &mut AttentionWorker, addr: &str) -> Result<(), RuntimeError> {
    let io = |e: std::io::Error| RuntimeError::Io(format!("control channel {addr}: {e}"));
    let mut stream = TcpStream::connect(addr).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    send(&mut stream, &FromWorker::Hello { rank: w.rank() })?;
    let result = obey(w, &mut stream);
    if let Err(e) = &result {
        let _ = send(
            &mut stream,
            &FromWorker::Error {
                message: format!("attention {}: {e}", w.rank()),
            },
        );
    }
    result
}

fn obey(w: &mut AttentionWorker, stream: &mut TcpStream) -> Result<(), RuntimeError> {
    let io = |e: std::io::Error| RuntimeError::Io(format!("control channel: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(io)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
    let mut line = String::new();
    loop {
        match reader.read_line(&mut line) {
            Ok(0) => {
                return Err(RuntimeError::Io(
                    "the engine closed the control channel".into(),
                ))
            }
            Ok(_) if line.ends_with('\n') => {}
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                w.idle()?;
                continue;
            }
            Err(e) => return Err(io(e)),
        }
        let cmd: ToWorker = serde_json::from_str(line.trim_end())
            .map_err(|e| RuntimeError::Io(format!("control channel: bad command {line:?}: {e}")))?;
        line.clear();
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
            ToWorker::Step => {
                let r = w.step()?;
                send(
                    stream,
                    &FromWorker::Stepped {
                        tokens: r.tokens,
                        prompt_logprobs: r.prompt_logprobs,
                        timings: r.timings,
                        rows: r.rows,
                        wall_ns: r.wall_ns,
                        group_active: r.group_active,
                    },
                )?;
            }
            ToWorker::Shutdown => {
                w.cancel_all();
                while w.step()?.group_active {}
                return Ok(());
            }
        }
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
