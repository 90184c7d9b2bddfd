//! End to end through the front door with the protocols users bring, served
//! and called by stock libraries: a WebSocket echo (Python `websockets`) and a
//! gRPC health service behind an h2c route (Python `grpcio`, the server and the
//! client both). Needs Debian's `python3-websockets` and `python3-grpcio`
//! (installed by `tests/scripts/test.sh`): without them the tests skip with a
//! message, and fail when `CI=true`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use skymirror_tests::{Cluster, free_port, providers_yaml};

const WAIT: Duration = Duration::from_secs(30);
const PYTHON: &str = "/usr/bin/python3";

/// Whether Debian's Python has `modules`; fails under CI when not.
fn python_with(test: &str, modules: &[&str], packages: &str) -> Result<bool> {
    let found = Command::new(PYTHON)
        .arg("-c")
        .arg(format!("import {}", modules.join(", ")))
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Ok(true);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        bail!("{test} needs {PYTHON} with {modules:?} (Debian: {packages}), and CI=true");
    }
    eprintln!("skipping {test}: {PYTHON} lacks {modules:?} (apt-get install {packages})");
    Ok(false)
}

/// An app running `script` with Debian's Python on one port, `port`, checked by
/// TCP, routed at `listen` with `routing_extra` settings.
fn python_app(
    name: &str,
    script: &std::path::Path,
    listen: SocketAddr,
    routing_extra: &str,
) -> String {
    format!(
        "apiVersion: skymirror.dev/v1
kind: App
metadata:
  name: {name}
spec:
  command: {PYTHON}
  args: [\"{}\"]
  ports:
    - name: main
  replicas: 1
  stopGracePeriod: 2s
  placement:
    mode: mirror
  health:
    tcp: {{port: main}}
    interval: 500ms
    timeout: 400ms
  routing:
    listen: \"{listen}\"
    port: main
{routing_extra}",
        script.display()
    )
}

/// Two providers, the app on both, a front door in front; returns the front.
fn setup(c: &mut Cluster, name: &str, app: &str) -> Result<()> {
    c.apply_ok("providers.yaml", &providers_yaml(&["aa", "bb"]))?;
    for p in ["aa", "bb"] {
        c.start_agent(p)?;
    }
    c.apply_ok(&format!("{name}.yaml"), app)?;
    c.wait_ready(name, &["aa", "bb"], 1, 1, WAIT)?;
    c.start_edge(&[])?;
    Ok(())
}

/// Runs a Python client until it prints `ok` (the front door may not have
/// the table yet on the first tries).
fn client_until_ok(
    c: &mut Cluster,
    what: &str,
    script: &std::path::Path,
    arg: &str,
) -> Result<String> {
    c.wait_until(what, WAIT, |_| {
        let out = Command::new(PYTHON)
            .arg(script)
            .arg(arg)
            .output()
            .context("running the Python client")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && stdout.contains("ok") {
            Ok(Some(stdout))
        } else {
            bail!(
                "client exited {}: {}{}",
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            )
        }
    })
}

const WS_SERVER: &str = r#"
import asyncio, os, websockets

async def echo(ws, path=None):
    async for message in ws:
        await ws.send(message)

async def main():
    async with websockets.serve(echo, "127.0.0.1", int(os.environ["PORT"])):
        await asyncio.Future()

asyncio.run(main())
"#;

const WS_CLIENT: &str = r#"
import asyncio, sys, websockets

async def main(url):
    async with websockets.connect(url, open_timeout=5) as ws:
        for message in ["hello", "through the front door", "x" * 70000]:
            await ws.send(message)
            answer = await asyncio.wait_for(ws.recv(), 5)
            assert answer == message, (len(answer), len(message))
    print("ok")

asyncio.run(main(sys.argv[1]))
"#;

#[test]
fn a_websocket_echo_through_the_front_door() -> Result<()> {
    if !python_with("the WebSocket test", &["websockets"], "python3-websockets")? {
        return Ok(());
    }
    let mut c = Cluster::start()?;
    let server = c.write_spec("ws_server.py", WS_SERVER)?;
    let client = c.write_spec("ws_client.py", WS_CLIENT)?;
    let front = free_port()?;
    setup(&mut c, "echo", &python_app("echo", &server, front, ""))?;
    let out = client_until_ok(
        &mut c,
        "a WebSocket echo through the front door",
        &client,
        &format!("ws://{front}/chat"),
    )?;
    eprintln!("websocket client: {}", out.trim());
    Ok(())
}

/// A gRPC server with only `grpc.health.v1.Health/Check`, answering SERVING,
/// built on grpcio's generic handlers (raw bytes: no generated code needed).
const GRPC_SERVER: &str = r#"
import os
from concurrent import futures
import grpc

SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}

def check(request, context):
    return SERVING

health = grpc.method_handlers_generic_handler(
    "grpc.health.v1.Health",
    {"Check": grpc.unary_unary_rpc_method_handler(check)},
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((health,))
server.add_insecure_port("127.0.0.1:" + os.environ["PORT"])
server.start()
server.wait_for_termination()
"#;

/// Calls Check (expects SERVING) and an unknown method (expects the gRPC status
/// UNIMPLEMENTED, which comes back in trailers).
const GRPC_CLIENT: &str = r#"
import sys
import grpc

channel = grpc.insecure_channel(sys.argv[1])
check = channel.unary_unary("/grpc.health.v1.Health/Check")
answer, call = check.with_call(b"", timeout=5)
assert answer == b"\x08\x01", answer
assert call.code() == grpc.StatusCode.OK, call.code()
try:
    channel.unary_unary("/grpc.health.v1.Health/Nothing")(b"", timeout=5)
    print("an unknown method succeeded")
    sys.exit(1)
except grpc.RpcError as e:
    code = e.code()
assert code == grpc.StatusCode.UNIMPLEMENTED, code
print("ok: SERVING, then", code)
"#;

#[test]
fn a_grpc_health_service_behind_an_h2c_route() -> Result<()> {
    if !python_with("the gRPC test", &["grpc"], "python3-grpcio")? {
        return Ok(());
    }
    let mut c = Cluster::start()?;
    let server = c.write_spec("grpc_server.py", GRPC_SERVER)?;
    let client = c.write_spec("grpc_client.py", GRPC_CLIENT)?;
    let front = free_port()?;
    setup(
        &mut c,
        "health",
        &python_app("health", &server, front, "    upstreamProtocol: h2c\n"),
    )?;
    let out = client_until_ok(
        &mut c,
        "a gRPC call through the front door",
        &client,
        &front.to_string(),
    )?;
    eprintln!("grpc client: {}", out.trim());
    Ok(())
}
