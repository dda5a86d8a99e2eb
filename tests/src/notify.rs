//! Receivers for the notifier's tests, on loopback ports of their own: a webhook receiver that
//! answers from a script (statuses, or holding a request unanswered) and records every request,
//! and an SMTP sink that accepts every message and records it. Both also speak TLS with a
//! certificate of the test's own CA ([`crate::certs`]): `https://`, and `smtps://` or STARTTLS with
//! `AUTH PLAIN`. Tests wait on what these saw.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;

use crate::certs::PemPair;

/// A TLS acceptor presenting `server` (certificate chain and key made by a test CA).
pub fn acceptor(server: &PemPair) -> TlsAcceptor {
    let certs = prebuilds_runtime::tls::read_certificates(&server.cert, "test certificate")
        .expect("test certificate");
    let key = prebuilds_runtime::tls::read_private_key(&server.key, "test key").expect("test key");
    let config = rustls::ServerConfig::builder_with_provider(prebuilds_runtime::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
    TlsAcceptor::from(Arc::new(config))
}

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status with this body.
    Status(u16, &'static str),
    /// No answer at all: the connection stays open until the client goes away (a notifier killed
    /// mid-delivery).
    Hold,
}

/// One request as the webhook receiver saw it, with the status it answered (None: held).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub answered: Option<u16>,
}

impl Request {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the webhook body is JSON")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// An HTTP/1.1 server that answers POSTs from a script (then 200 once the script is used up).
#[derive(Debug)]
pub struct WebhookReceiver {
    /// `http://127.0.0.1:<port>/hook`
    pub url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start(script: Vec<Reply>) -> WebhookReceiver {
        WebhookReceiver::listen(script, None).await
    }

    /// The same over TLS (`https://127.0.0.1:<port>/hook`), presenting `server`.
    pub async fn start_tls(script: Vec<Reply>, server: &PemPair) -> WebhookReceiver {
        WebhookReceiver::listen(script, Some(acceptor(server))).await
    }

    async fn listen(script: Vec<Reply>, tls: Option<TlsAcceptor>) -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let seen = requests.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                let script = script.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = match tls {
                        None => serve(stream, seen, script).await,
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => serve(stream, seen, script).await,
                            Err(e) => Err(e),
                        },
                    };
                });
            }
        });
        WebhookReceiver {
            url: format!("{scheme}://127.0.0.1:{port}/hook"),
            requests,
            task,
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests answered with a 2xx.
    pub fn delivered(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.answered.is_some_and(|s| (200..300).contains(&s)))
            .collect()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    seen: Arc<Mutex<Vec<Request>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await?;
    let reply = script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Reply::Status(200, "ok"));
    let answered = match reply {
        Reply::Status(status, _) => Some(status),
        Reply::Hold => None,
    };
    seen.lock().unwrap().push(Request {
        method,
        path,
        headers,
        body,
        answered,
    });
    match reply {
        Reply::Status(status, text) => {
            let response = format!(
                "HTTP/1.1 {status} Scripted\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
            let mut stream = reader.into_inner();
            stream.write_all(response.as_bytes()).await?;
            stream.shutdown().await
        }
        Reply::Hold => {
            // Until the client closes the connection.
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest).await;
            Ok(())
        }
    }
}

/// One message the SMTP sink accepted.
#[derive(Debug, Clone)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    /// Whether the session was encrypted when the message came.
    pub encrypted: bool,
    /// `(user, password)` of the session's `AUTH PLAIN`, if any.
    pub login: Option<(String, String)>,
    /// The message as sent (headers and body, dot-stuffing undone).
    pub data: String,
}

impl Mail {
    /// A header's value (first occurrence, folded lines joined).
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next().unwrap_or_default();
        let mut value: Option<String> = None;
        for line in head.split("\r\n") {
            if let Some(v) = value.as_mut() {
                if line.starts_with([' ', '\t']) {
                    v.push(' ');
                    v.push_str(line.trim());
                    continue;
                }
                break;
            }
            if let Some((n, v)) = line.split_once(':') {
                if n.eq_ignore_ascii_case(name) {
                    value = Some(v.trim().to_owned());
                }
            }
        }
        value
    }

    /// The body, decoded when it is quoted-printable.
    pub fn text(&self) -> String {
        let body = self
            .data
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        let quoted = self
            .header("Content-Transfer-Encoding")
            .is_some_and(|e| e.eq_ignore_ascii_case("quoted-printable"));
        if !quoted {
            return body.to_owned();
        }
        let joined = body.replace("=\r\n", "");
        let bytes = joined.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'=' && i + 3 <= bytes.len() {
                if let Some(byte) = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    out.push(byte);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// How the SMTP sink protects its sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkTls {
    None,
    /// TLS from the first byte (`smtps://`).
    Implicit,
    /// `STARTTLS` offered (and `AUTH PLAIN` only after it).
    StartTls,
}

/// An SMTP server that accepts every message: plaintext, `smtps://` or STARTTLS.
#[derive(Debug)]
pub struct SmtpSink {
    /// `smtp://127.0.0.1:<port>` (`smtps://…` for [`SmtpSink::start_tls`]).
    pub url: String,
    pub port: u16,
    mails: Arc<Mutex<Vec<Mail>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SmtpSink {
    /// Plaintext, no authentication.
    pub async fn start() -> SmtpSink {
        SmtpSink::listen(SinkTls::None, None).await
    }

    /// TLS from the first byte, presenting `server`.
    pub async fn start_tls(server: &PemPair) -> SmtpSink {
        SmtpSink::listen(SinkTls::Implicit, Some(acceptor(server))).await
    }

    /// Plaintext until `STARTTLS`, then TLS presenting `server`; `AUTH PLAIN` is offered only
    /// once encrypted.
    pub async fn start_starttls(server: &PemPair) -> SmtpSink {
        SmtpSink::listen(SinkTls::StartTls, Some(acceptor(server))).await
    }

    async fn listen(mode: SinkTls, tls: Option<TlsAcceptor>) -> SmtpSink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let seen = mails.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = sink_connection(stream, mode, tls, seen).await;
                });
            }
        });
        let scheme = if mode == SinkTls::Implicit {
            "smtps"
        } else {
            "smtp"
        };
        SmtpSink {
            url: format!("{scheme}://127.0.0.1:{port}"),
            port,
            mails,
            task,
        }
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn sink_connection(
    stream: TcpStream,
    mode: SinkTls,
    tls: Option<TlsAcceptor>,
    seen: Arc<Mutex<Vec<Mail>>>,
) -> std::io::Result<()> {
    match (mode, tls) {
        (SinkTls::Implicit, Some(tls)) => {
            let stream = tls.accept(stream).await?;
            smtp_session(BufReader::new(stream), true, false, true, &seen).await?;
        }
        (SinkTls::StartTls, Some(tls)) => {
            let plain = BufReader::new(stream);
            if let Some(reader) = smtp_session(plain, false, true, true, &seen).await? {
                // STARTTLS: nothing may be buffered past the command (RFC 3207).
                let stream = tls.accept(reader.into_inner()).await?;
                smtp_session(BufReader::new(stream), true, false, false, &seen).await?;
            }
        }
        _ => {
            smtp_session(BufReader::new(stream), false, false, true, &seen).await?;
        }
    }
    Ok(())
}

/// One SMTP session; returns the reader when the client asked for STARTTLS (and `offer_starttls`).
/// `greet`: send the 220 greeting (not after STARTTLS, where the client speaks first).
async fn smtp_session<S: AsyncRead + AsyncWrite + Unpin>(
    mut reader: BufReader<S>,
    encrypted: bool,
    offer_starttls: bool,
    greet: bool,
    seen: &Arc<Mutex<Vec<Mail>>>,
) -> std::io::Result<Option<BufReader<S>>> {
    if greet {
        reader.get_mut().write_all(b"220 sink ESMTP\r\n").await?;
    }
    let mut from = String::new();
    let mut to = Vec::new();
    let mut login = None;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        let command = line.trim_end().to_owned();
        let upper = command.to_ascii_uppercase();
        let reply: Vec<u8> = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            let mut text = String::from("250-sink\r\n");
            if offer_starttls && !encrypted {
                text.push_str("250-STARTTLS\r\n");
            }
            if encrypted {
                text.push_str("250-AUTH PLAIN\r\n");
            }
            text.push_str("250 8BITMIME\r\n");
            text.into_bytes()
        } else if upper == "STARTTLS" && offer_starttls && !encrypted {
            reader.get_mut().write_all(b"220 go ahead\r\n").await?;
            return Ok(Some(reader));
        } else if upper.starts_with("AUTH PLAIN") {
            let encoded = command[10..].trim();
            login = decode_plain(encoded);
            if encrypted && login.is_some() {
                b"235 authenticated\r\n".to_vec()
            } else {
                b"535 refused\r\n".to_vec()
            }
        } else if upper.starts_with("MAIL FROM:") {
            from = command[10..].trim().to_owned();
            to.clear();
            b"250 OK\r\n".to_vec()
        } else if upper.starts_with("RCPT TO:") {
            to.push(command[8..].trim().to_owned());
            b"250 OK\r\n".to_vec()
        } else if upper == "DATA" {
            reader.get_mut().write_all(b"354 go ahead\r\n").await?;
            let mut data = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).await? == 0 {
                    return Ok(None);
                }
                if line == ".\r\n" {
                    break;
                }
                data.push_str(line.strip_prefix('.').unwrap_or(&line));
            }
            seen.lock().unwrap().push(Mail {
                from: from.clone(),
                to: to.clone(),
                encrypted,
                login: login.clone(),
                data,
            });
            b"250 OK queued\r\n".to_vec()
        } else if upper == "QUIT" {
            reader.get_mut().write_all(b"221 bye\r\n").await?;
            return Ok(None);
        } else if upper == "RSET" || upper == "NOOP" {
            b"250 OK\r\n".to_vec()
        } else {
            b"502 not implemented\r\n".to_vec()
        };
        reader.get_mut().write_all(&reply).await?;
    }
}

/// `(user, password)` of an `AUTH PLAIN` initial response (base64 of `\0user\0password`).
fn decode_plain(encoded: &str) -> Option<(String, String)> {
    let bytes = data_encoding::BASE64.decode(encoded.as_bytes()).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut parts = text.split('\0');
    let _authzid = parts.next()?;
    Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
}
