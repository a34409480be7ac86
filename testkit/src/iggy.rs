//! A real Iggy server as a child process: started on free ports in a temp directory, with
//! the settings Owlery expects (root `iggy`/`iggy`, TCP_NODELAY; optionally saving and
//! fsyncing every batch), stopped on drop.
//!
//! The binary is found through `IGGY_SERVER_BIN`, then `../shared/iggy/iggy-server` beside
//! the checkout (or beside the working directory), then `PATH`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// The root user Owlery and the tests log in as.
const USERNAME: &str = "iggy";
const PASSWORD: &str = "iggy";

pub struct IggyServer {
    binary: PathBuf,
    pub dir: tempfile::TempDir,
    pub tcp_port: u16,
    pub http_port: u16,
    /// Save and fsync every batch (what zero loss across an Iggy crash needs).
    durable: bool,
    child: Option<Child>,
}

/// Where `iggy-server` is, if anywhere.
pub fn find_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("IGGY_SERVER_BIN") {
        return Some(PathBuf::from(path));
    }
    let beside_checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/iggy/iggy-server");
    let beside_cwd = PathBuf::from("../shared/iggy/iggy-server");
    if let Some(found) = [beside_checkout, beside_cwd].into_iter().find(|p| p.exists()) {
        // Absolute: the server is started in a directory of its own, where a path relative
        // to this process's directory would name nothing.
        return Some(std::path::absolute(&found).unwrap_or(found));
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join("iggy-server")).find(|p| p.exists())
}

/// For tests: the binary. Panics, naming where it looked, when there is none: a test that
/// needs Iggy never passes without it (`OWLERY_SKIP_IGGY=1` compiles those tests as ignored).
pub fn locate() -> PathBuf {
    find_binary().unwrap_or_else(|| {
        panic!(
            "no iggy-server found: set IGGY_SERVER_BIN, put it at ../shared/iggy/iggy-server or on PATH \
             (or set OWLERY_SKIP_IGGY=1 to skip the Iggy tests)"
        )
    })
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl IggyServer {
    /// Start `binary`; ready when both its TCP and HTTP ports accept connections.
    pub fn start_binary(binary: &Path, durable: bool) -> Result<IggyServer, Error> {
        let mut server = IggyServer {
            binary: binary.to_owned(),
            dir: tempfile::tempdir()?,
            tcp_port: free_port()?,
            http_port: free_port()?,
            durable,
            child: None,
        };
        server.try_restart()?;
        Ok(server)
    }

    /// For tests: start the server `locate` finds; panics when there is none.
    pub fn start(durable: bool) -> IggyServer {
        IggyServer::start_binary(&locate(), durable).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.tcp_port)
    }

    /// The environment that puts `owlery serve` on this server instead of the embedded log.
    pub fn host_env(&self) -> Vec<(String, String)> {
        [
            ("OWLERY_LOG", "iggy".to_owned()),
            ("IGGY_HOST", "127.0.0.1".to_owned()),
            ("IGGY_PORT", self.tcp_port.to_string()),
            ("IGGY_USERNAME", USERNAME.to_owned()),
            ("IGGY_PASSWORD", PASSWORD.to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    }

    /// (Re)start on the same ports and data; waits until it accepts connections.
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_restart(&mut self) -> Result<(), Error> {
        if self.child.is_some() {
            return Err(Error::AlreadyRunning("iggy-server"));
        }
        let child = self.command()?.spawn().map_err(|source| Error::Spawn { binary: self.binary.clone(), source })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.address()).is_err() || TcpStream::connect(("127.0.0.1", self.http_port)).is_err()
        {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().transpose()).transpose()? {
                self.child = None;
                return Err(Error::IggyExited { status, log: self.log() });
            }
            if Instant::now() > deadline {
                return Err(Error::IggyTimedOut { log: self.log() });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The server's command: its data, ports and users, its output into `server.log`.
    fn command(&self) -> std::io::Result<Command> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("server.log"))?;
        let mut command = Command::new(&self.binary);
        command
            .env("IGGY_SYSTEM_PATH", self.dir.path().join("data"))
            .env("IGGY_TCP_ADDRESS", self.address())
            .env("IGGY_HTTP_ADDRESS", format!("127.0.0.1:{}", self.http_port))
            .env("IGGY_QUIC_ENABLED", "false")
            .env("IGGY_WEBSOCKET_ENABLED", "false")
            .env("IGGY_ROOT_USERNAME", USERNAME)
            .env("IGGY_ROOT_PASSWORD", PASSWORD)
            .env("IGGY_TCP_SOCKET_OVERRIDE_DEFAULTS", "true")
            .env("IGGY_TCP_SOCKET_NODELAY", "true")
            .current_dir(self.dir.path())
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null());
        if self.durable {
            command
                .env("IGGY_SYSTEM_PARTITION_MESSAGES_REQUIRED_TO_SAVE", "1")
                .env("IGGY_SYSTEM_PARTITION_ENFORCE_FSYNC", "true");
        }
        Ok(command)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the server wrote to stdout and stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for IggyServer {
    fn drop(&mut self) {
        self.kill9();
    }
}
