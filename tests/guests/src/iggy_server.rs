//! A real Iggy server for tests: started on free ports in a temp directory, stopped on drop.
//!
//! Found through `IGGY_SERVER_BIN`, then `../shared/iggy/iggy-server` beside the repository,
//! then `PATH`. When there is none, tests fail loudly, unless `OWLERY_SKIP_IGGY=1` is set,
//! in which case each Iggy test prints a warning and does nothing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct IggyServer {
    binary: PathBuf,
    pub dir: tempfile::TempDir,
    pub tcp_port: u16,
    pub http_port: u16,
    /// Save and fsync every batch (what zero loss across an Iggy crash needs).
    durable: bool,
    child: Option<Child>,
}

fn find_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("IGGY_SERVER_BIN") {
        return Some(PathBuf::from(path));
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/iggy/iggy-server");
    if beside.exists() {
        return Some(beside);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join("iggy-server")).find(|p| p.exists())
}

/// The server binary; `None` (after a loud warning) only when there is none and
/// `OWLERY_SKIP_IGGY=1`. Panics when there is none otherwise.
pub fn locate() -> Option<PathBuf> {
    if let Some(binary) = find_binary() {
        return Some(binary);
    }
    if std::env::var("OWLERY_SKIP_IGGY").is_ok_and(|v| v == "1") {
        eprintln!("\n!!! SKIPPED: no iggy-server found (IGGY_SERVER_BIN, ../shared/iggy/iggy-server, PATH) !!!\n");
        return None;
    }
    panic!(
        "no iggy-server found: set IGGY_SERVER_BIN, put it at ../shared/iggy/iggy-server or on PATH \
         (or set OWLERY_SKIP_IGGY=1 to skip the Iggy tests, loudly)"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl IggyServer {
    /// Start a server, or `None` (after a loud warning) when there is none and
    /// `OWLERY_SKIP_IGGY=1`. Panics when there is none otherwise.
    pub fn start(durable: bool) -> Option<IggyServer> {
        let Some(binary) = find_binary() else {
            if std::env::var("OWLERY_SKIP_IGGY").is_ok_and(|v| v == "1") {
                eprintln!(
                    "\n!!! SKIPPED: no iggy-server found (IGGY_SERVER_BIN, ../shared/iggy/iggy-server, PATH) !!!\n"
                );
                return None;
            }
            panic!(
                "no iggy-server found: set IGGY_SERVER_BIN, put it at ../shared/iggy/iggy-server or on PATH \
                 (or set OWLERY_SKIP_IGGY=1 to skip the Iggy tests, loudly)"
            );
        };
        let mut server = IggyServer {
            binary,
            dir: tempfile::tempdir().unwrap(),
            tcp_port: free_port(),
            http_port: free_port(),
            durable,
            child: None,
        };
        server.restart();
        Some(server)
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.tcp_port)
    }

    /// (Re)start on the same ports and data; waits until the TCP port accepts.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("server.log")).unwrap();
        let mut command = Command::new(&self.binary);
        command
            .env("IGGY_SYSTEM_PATH", self.dir.path().join("data"))
            .env("IGGY_TCP_ADDRESS", self.address())
            .env("IGGY_HTTP_ADDRESS", format!("127.0.0.1:{}", self.http_port))
            .env("IGGY_QUIC_ENABLED", "false")
            .env("IGGY_WEBSOCKET_ENABLED", "false")
            .env("IGGY_ROOT_USERNAME", "iggy")
            .env("IGGY_ROOT_PASSWORD", "iggy")
            .env("IGGY_TCP_SOCKET_OVERRIDE_DEFAULTS", "true")
            .env("IGGY_TCP_SOCKET_NODELAY", "true")
            .current_dir(self.dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null());
        if self.durable {
            command
                .env("IGGY_SYSTEM_PARTITION_MESSAGES_REQUIRED_TO_SAVE", "1")
                .env("IGGY_SYSTEM_PARTITION_ENFORCE_FSYNC", "true");
        }
        let child = command.spawn().expect("starting iggy-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(self.address()).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("iggy-server exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "iggy-server did not start:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for IggyServer {
    fn drop(&mut self) {
        self.kill9();
    }
}
