//! `skymirror-example`: a tiny HTTP app for skymirror's examples, all-in-one
//! mode and end-to-end tests.
//!
//! `GET /` answers with who is serving (`SKYMIRROR_REPLICA` or the host name, and
//! the pid), so a test can tell which replica took a request; `GET /healthz`
//! answers `ok` for health checks. Knobs make it misbehave on purpose: start
//! slowly, crash after a while, exit at once, or fail `/healthz` while a file
//! exists. It is std only, one thread per connection, so it builds wherever the
//! workspace does.
//!
//! SIGTERM: std cannot install a signal handler without `unsafe`, so the default
//! action ends the process at once (its status says "killed by signal 15", not
//! exit code 0). That is all a stop needs here: there is no state to flush, and
//! in-flight requests are only greetings and health checks.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use std::{env, process, thread};

const USAGE: &str = "usage: skymirror-example [options]

  --host HOST              address to listen on (default 127.0.0.1)
  --port N                 port to listen on ($PORT, default 8080; 0 picks one)
  --startup-delay-ms MS    wait before listening ($STARTUP_DELAY_MS)
  --crash-after-ms MS      exit with code 1 that long after start ($CRASH_AFTER_MS)
  --exit-code N            exit at once with code N ($EXIT_IMMEDIATELY)
  --unhealthy-file PATH    /healthz answers 503 while PATH exists ($UNHEALTHY_FILE)
  --help                   print this help

GET / answers with $GREETING (if set) and who is serving; GET /healthz with ok.";

/// Options that take a value; each may also be written `--name=value`.
const OPTIONS: [&str; 6] = [
    "--host",
    "--port",
    "--startup-delay-ms",
    "--crash-after-ms",
    "--exit-code",
    "--unhealthy-file",
];
/// How long an idle keep-alive connection may hold its thread.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest request or header line accepted, so a client cannot exhaust memory.
const MAX_LINE: u64 = 8 * 1024;
/// Most header lines accepted per request, for the same reason.
const MAX_HEADERS: usize = 100;
/// Largest request body accepted (it is read and discarded).
const MAX_BODY: u64 = 1024 * 1024;

/// What `GET /` and `GET /healthz` need to answer.
struct Config {
    /// `/healthz` fails while this file exists, so tests can flip health from outside.
    unhealthy_file: Option<PathBuf>,
    /// First line of `GET /`, so tests can tell workload versions apart.
    greeting: Option<String>,
    /// Who this instance is, so tests can tell replicas apart.
    identity: String,
}

/// The value of an option, from its flag or else its environment variable.
fn setting<T: FromStr>(
    flags: &[(String, String)],
    flag: &str,
    var: &str,
) -> Result<Option<T>, String> {
    let value = match flags.iter().rev().find(|(name, _)| name == flag) {
        Some((_, value)) => value.clone(),
        None => match env::var(var) {
            Ok(value) if !value.is_empty() => value,
            _ => return Ok(None),
        },
    };
    let parsed = value
        .trim()
        .parse()
        .map_err(|_| format!("{flag} / ${var}: bad value {value:?}"));
    parsed.map(Some)
}

/// Parses `--name value` and `--name=value` pairs; `Ok(None)` asks for help.
fn parse_flags(
    mut args: impl Iterator<Item = String>,
) -> Result<Option<Vec<(String, String)>>, String> {
    let mut flags = Vec::new();
    while let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            return Ok(None);
        }
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name.to_string(), Some(value.to_string())),
            None => (arg, None),
        };
        if !OPTIONS.contains(&name.as_str()) {
            return Err(format!("unknown option {name}"));
        }
        let value = match inline {
            Some(value) => value,
            None => args.next().ok_or(format!("{name} needs a value"))?,
        };
        flags.push((name, value));
    }
    Ok(Some(flags))
}

fn main() {
    if let Err(message) = run() {
        eprintln!("skymirror-example: {message}");
        process::exit(2);
    }
}

/// Applies the knobs, then serves until killed.
fn run() -> Result<(), String> {
    let Some(flags) = parse_flags(env::args().skip(1)).map_err(|e| format!("{e}\n\n{USAGE}"))?
    else {
        println!("{USAGE}");
        return Ok(());
    };
    if let Some(code) = setting::<i32>(&flags, "--exit-code", "EXIT_IMMEDIATELY")? {
        eprintln!("exiting with code {code} as asked");
        process::exit(code);
    }
    // Counted from process start, so a slow start eats into the time to crash.
    if let Some(ms) = setting::<u64>(&flags, "--crash-after-ms", "CRASH_AFTER_MS")? {
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(ms));
            eprintln!("crashing after {ms} ms as asked");
            process::exit(1);
        });
    }
    let delay = setting::<u64>(&flags, "--startup-delay-ms", "STARTUP_DELAY_MS")?;
    thread::sleep(Duration::from_millis(delay.unwrap_or(0)));

    // `--host` has no environment variable: `HOST` often means something else.
    let host = flags
        .iter()
        .rev()
        .find(|(name, _)| name == "--host")
        .map_or("127.0.0.1", |(_, host)| host);
    let port = setting::<u16>(&flags, "--port", "PORT")?.unwrap_or(8080);
    let listener =
        TcpListener::bind((host, port)).map_err(|e| format!("listen on {host}:{port}: {e}"))?;
    let address = listener
        .local_addr()
        .map_err(|e| format!("listen on {host}:{port}: {e}"))?;
    println!("listening on {address}");
    let _ = io::stdout().flush();

    let config = Arc::new(Config {
        unhealthy_file: setting::<PathBuf>(&flags, "--unhealthy-file", "UNHEALTHY_FILE")?,
        greeting: env::var("GREETING").ok(),
        identity: env::var("SKYMIRROR_REPLICA")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map_or_else(|| "unknown host".into(), |s| s.trim().to_string()),
    });
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let config = Arc::clone(&config);
        thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string());
            if let Err(e) = serve(stream, &config) {
                eprintln!("connection from {peer}: {e}");
            }
        });
    }
    Ok(())
}

/// Serves requests on one connection until the client closes it or asks to.
fn serve(stream: TcpStream, config: &Config) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let (status, body, keep_alive) = match read_request(&mut reader) {
            Ok(Some((method, path, keep_alive))) => {
                let (status, body) = route(&method, &path, config);
                (status, body, keep_alive)
            }
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                (400, format!("bad request: {e}\n"), false)
            }
            Err(e) => return Err(e),
        };
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Service Unavailable",
        };
        let connection = if keep_alive { "keep-alive" } else { "close" };
        // One write per response: a formatted write straight to the socket
        // would send each piece as its own segment.
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        writer.write_all(response.as_bytes())?;
        if !keep_alive {
            return Ok(());
        }
    }
}

/// Reads one request and discards its body: `(method, path, keep_alive)`, or
/// `None` when the client closed or idled out between requests.
fn read_request(reader: &mut BufReader<TcpStream>) -> io::Result<Option<(String, String, bool)>> {
    let bad = |message: &str| io::Error::new(io::ErrorKind::InvalidData, message.to_string());
    let mut line = String::new();
    match reader.by_ref().take(MAX_LINE).read_line(&mut line) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    // HTTP/1.1 keeps the connection open unless told otherwise; HTTP/1.0 closes it.
    let mut keep_alive = version == "HTTP/1.1";
    let mut length = 0;
    for count in 0.. {
        let mut header = String::new();
        reader.by_ref().take(MAX_LINE).read_line(&mut header)?;
        if !header.ends_with('\n') || count > MAX_HEADERS {
            return Err(bad(
                "header too long, too many headers or request cut short",
            ));
        }
        let Some((name, value)) = header.split_once(':') else {
            if header.trim().is_empty() {
                break;
            }
            return Err(bad("malformed header"));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().map_err(|_| bad("bad Content-Length"))?,
            "transfer-encoding" => return Err(bad("chunked bodies are not supported")),
            "connection" => {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
            }
            _ => {}
        }
    }
    if length > MAX_BODY {
        return Err(bad("body too large"));
    }
    if io::copy(&mut reader.by_ref().take(length), &mut io::sink())? < length {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "body cut short",
        ));
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok(Some((method.to_string(), path.to_string(), keep_alive)))
}

/// Status and body for a request.
fn route(method: &str, path: &str, config: &Config) -> (u16, String) {
    if method != "GET" {
        return (405, "method not allowed\n".into());
    }
    match path {
        "/healthz" if config.unhealthy_file.as_ref().is_some_and(|f| f.exists()) => {
            (503, "unhealthy\n".into())
        }
        "/healthz" => (200, "ok".into()),
        "/" => {
            let hello = format!("hello from {} (pid {})\n", config.identity, process::id());
            match &config.greeting {
                Some(greeting) => (200, format!("{greeting}\n{hello}")),
                None => (200, hello),
            }
        }
        _ => (404, "not found\n".into()),
    }
}
