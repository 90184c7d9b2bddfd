//! `skymirror logs`: prints replica output as it streams from the daemon.

use std::collections::BTreeMap;

use anyhow::bail;
use skymirror_proto::v1 as pb;

use super::ClientError;
use super::stdout::Stdout;

/// Longest unfinished line held back per replica before it is printed
/// anyway, so a replica that never ends its line cannot grow memory.
const MAX_PENDING: usize = 64 * 1024;

/// Arguments of `skymirror logs`.
#[derive(Debug)]
pub(crate) struct LogsArgs {
    pub app: String,
    pub provider: Option<String>,
    pub index: Option<u32>,
    pub tail: Option<u32>,
    pub follow: bool,
}

/// Prints the output of the replicas `args` names. Errors about replicas or
/// providers are printed as they come, and make the command fail at the end.
pub(crate) async fn run(mut client: super::Client, args: LogsArgs) -> anyhow::Result<()> {
    let provider = args.provider.unwrap_or_default();
    // One replica prints its output as is; several need telling apart.
    let shown = client
        .list_replicas(pb::ListReplicasRequest {
            app: args.app.clone(),
            provider: provider.clone(),
        })
        .await
        .map_err(ClientError::from)?
        .into_inner()
        .replicas
        .iter()
        .filter(|r| args.index.is_none_or(|i| r.index == i))
        .count();
    let mut stream = client
        .logs(pb::LogsRequest {
            app: args.app,
            provider,
            index: args.index,
            tail_lines: args.tail.unwrap_or(0),
            follow: args.follow,
        })
        .await
        .map_err(ClientError::from)?
        .into_inner();
    let mut lines = Lines::new(shown != 1);
    let mut errors = 0usize;
    while let Some(chunk) = stream.message().await.map_err(ClientError::from)? {
        // Locked per chunk: the lock is not held while waiting for the next
        // one, and what came is shown at once.
        let mut out = Stdout::lock();
        out.write_all(&lines.push(&chunk.replica, &chunk.data))?;
        out.flush()?;
        if !chunk.error.is_empty() {
            errors += 1;
            eprintln!("error: {}", chunk.error);
        }
    }
    let mut out = Stdout::lock();
    out.write_all(&lines.finish())?;
    out.flush()?;
    if errors > 0 {
        bail!("some output could not be read ({errors} error(s) above)");
    }
    Ok(())
}

/// Turns chunks of several replicas into whole lines, each prefixed with
/// `[app/provider/index] `; or, without prefixes, passes output through as is.
#[derive(Debug)]
pub(crate) struct Lines {
    prefix: bool,
    /// Each replica's unfinished last line.
    pending: BTreeMap<String, Vec<u8>>,
}

impl Lines {
    pub(crate) fn new(prefix: bool) -> Self {
        Lines {
            prefix,
            pending: BTreeMap::new(),
        }
    }

    /// What to print for a chunk of `replica`'s output.
    pub(crate) fn push(&mut self, replica: &str, data: &[u8]) -> Vec<u8> {
        if !self.prefix {
            return data.to_vec();
        }
        let pending = self.pending.entry(replica.to_string()).or_default();
        pending.extend_from_slice(data);
        let mut out = Vec::with_capacity(pending.len() + 64);
        let mut start = 0;
        while let Some(newline) = pending[start..].iter().position(|b| *b == b'\n') {
            let end = start + newline + 1;
            prefixed(&mut out, replica, &pending[start..end]);
            start = end;
        }
        pending.drain(..start);
        if pending.len() > MAX_PENDING {
            prefixed(&mut out, replica, pending);
            out.push(b'\n');
            pending.clear();
        }
        out
    }

    /// What is left once the stream ends: unfinished lines, ended.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for (replica, pending) in std::mem::take(&mut self.pending) {
            if !pending.is_empty() {
                prefixed(&mut out, &replica, &pending);
                out.push(b'\n');
            }
        }
        out
    }
}

fn prefixed(out: &mut Vec<u8>, replica: &str, line: &[u8]) {
    out.push(b'[');
    out.extend_from_slice(replica.as_bytes());
    out.extend_from_slice(b"] ");
    out.extend_from_slice(line);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn lines_of_several_replicas_stay_whole_and_prefixed() {
        let mut lines = Lines::new(true);
        assert_eq!(text(lines.push("web/aa/0", b"one\ntw")), "[web/aa/0] one\n");
        assert_eq!(text(lines.push("web/bb/0", b"uno\n")), "[web/bb/0] uno\n");
        assert_eq!(
            text(lines.push("web/aa/0", b"o\nthree\n\n")),
            "[web/aa/0] two\n[web/aa/0] three\n[web/aa/0] \n"
        );
        assert_eq!(text(lines.push("web/bb/0", b"dos")), "");
        assert_eq!(text(lines.finish()), "[web/bb/0] dos\n");
        assert_eq!(text(lines.finish()), "");
    }

    #[test]
    fn an_endless_line_is_printed_once_it_is_too_long() {
        let mut lines = Lines::new(true);
        assert!(lines.push("a/b/0", &vec![b'x'; MAX_PENDING]).is_empty());
        let out = lines.push("a/b/0", b"xy");
        assert_eq!(out.len(), "[a/b/0] ".len() + MAX_PENDING + 3);
        assert!(out.ends_with(b"xy\n"));
        assert!(lines.finish().is_empty());
    }

    #[test]
    fn one_replica_is_passed_through() {
        let mut lines = Lines::new(false);
        assert_eq!(text(lines.push("web/aa/0", b"one\ntw")), "one\ntw");
        assert_eq!(text(lines.push("web/aa/0", b"o\n")), "o\n");
        assert_eq!(text(lines.finish()), "");
    }
}
