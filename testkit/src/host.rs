//! One `owlery serve` child process in a directory the caller owns: data in `DIR/data`,
//! plugins in `DIR/plugins`, an optional `DIR/owlery.toml`, its log in `DIR/owlery.log`.
//! It listens on a free port (`--listen 127.0.0.1:0`) and is ready once it prints
//! `owlery listening on ADDRESS`; it can be stopped, killed and started again on the same
//! directories.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::Error;

/// What the host prints on stdout once it accepts connections (then its base URL).
const LISTENING: &str = "owlery listening on ";
/// How long a host may take to listen (compiling its plugins on a cold cache included).
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct HostProcess {
    binary: PathBuf,
    dir: PathBuf,
    /// Extra environment for the binary (e.g. the Iggy backend's settings).
    env: Vec<(String, String)>,
    rust_log: String,
    /// Pass the host's stderr through instead of writing it to `owlery.log`.
    show_log: bool,
    child: Option<Child>,
}

impl HostProcess {
    /// A host that will run `binary` (an `owlery` executable) in `dir`; creates the plugins
    /// directory, does not start it.
    pub fn new(binary: impl Into<PathBuf>, dir: &Path) -> std::io::Result<HostProcess> {
        std::fs::create_dir_all(dir.join("plugins"))?;
        Ok(HostProcess {
            binary: binary.into(),
            dir: dir.to_owned(),
            env: Vec::new(),
            rust_log: "info,wasmtime=warn,cranelift=warn".to_owned(),
            show_log: false,
            child: None,
        })
    }

    /// Extra environment variables for the host.
    pub fn env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> HostProcess {
        self.env.extend(vars);
        self
    }

    /// The host's `RUST_LOG` filter [default: info, wasmtime and cranelift at warn].
    pub fn rust_log(mut self, filter: &str) -> HostProcess {
        filter.clone_into(&mut self.rust_log);
        self
    }

    /// Show the host's log on this process's stderr instead of keeping it in `owlery.log`.
    pub fn show_log(mut self, show: bool) -> HostProcess {
        self.show_log = show;
        self
    }

    /// Install a plugin: its component and, when given, its manifest text.
    pub fn add_plugin(&self, name: &str, wasm: &Path, manifest: Option<&str>) -> std::io::Result<()> {
        std::fs::copy(wasm, self.plugins_dir().join(format!("{name}.wasm")))?;
        if let Some(text) = manifest {
            std::fs::write(self.plugins_dir().join(format!("{name}.toml")), text)?;
        }
        Ok(())
    }

    /// Give the host an `owlery.toml` in its working directory.
    pub fn write_config(&self, owlery_toml: &str) -> std::io::Result<()> {
        std::fs::write(self.dir.join("owlery.toml"), owlery_toml)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn plugins_dir(&self) -> PathBuf {
        self.dir.join("plugins")
    }

    /// The process id while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Start the binary (again) on the same directories; waits until it listens and returns
    /// its base URL (`http://127.0.0.1:PORT`).
    pub fn start(&mut self) -> Result<String, Error> {
        if self.child.is_some() {
            return Err(Error::AlreadyRunning("owlery"));
        }
        let mut child =
            self.command()?.spawn().map_err(|source| Error::Spawn { binary: self.binary.clone(), source })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads stdout to its end, so that the host never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(address) = line.strip_prefix(LISTENING) {
                    let _ = tx.send(address.to_owned());
                }
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(base) => {
                self.child = Some(child);
                Ok(base)
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(Error::HostDidNotStart { log: self.log() })
            }
        }
    }

    fn command(&self) -> std::io::Result<Command> {
        let stderr = if self.show_log {
            Stdio::inherit()
        } else {
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("owlery.log"))?.into()
        };
        let mut command = Command::new(&self.binary);
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--plugins-dir")
            .arg(self.plugins_dir())
            .env("RUST_LOG", &self.rust_log)
            // Only what this harness sets configures the host, not the caller's environment.
            .env_remove("OWLERY_CONFIG")
            .env_remove("OWLERY_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdout(Stdio::piped())
            .stderr(stderr);
        Ok(command)
    }

    /// `kill -9`: no shutdown, no flush.
    pub fn kill9(&mut self) -> std::io::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then wait for the host to exit; its exit status, if it was running.
    pub fn stop(&mut self) -> std::io::Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else { return Ok(None) };
        signal_terminate(&child)?;
        child.wait().map(Some)
    }

    /// SIGTERM, then wait up to `limit` for the host to exit: how long it took and its exit
    /// status, or `None` when it was still running at `limit` (it is then killed with -9).
    pub fn terminate(&mut self, limit: Duration) -> std::io::Result<(Duration, Option<ExitStatus>)> {
        let Some(mut child) = self.child.take() else { return Ok((Duration::ZERO, None)) };
        let started = Instant::now();
        signal_terminate(&child)?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((started.elapsed(), Some(status)));
            }
            if started.elapsed() > limit {
                child.kill()?;
                child.wait()?;
                return Ok((started.elapsed(), None));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the host wrote to stderr (nothing when its log is shown instead).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("owlery.log")).unwrap_or_default()
    }
}

fn signal_terminate(child: &Child) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(child.id()).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) with a pid this process spawned and has not yet waited for.
    #[allow(unsafe_code)]
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    if sent != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The end of a log (its last 256 KiB, long lines cut), for failure messages: a host whose
/// plugin floods its log must not flood the caller's output.
pub fn tail(log: &str) -> String {
    const KEEP: usize = 256 << 10;
    const LINE: usize = 2 << 10;
    let start = log.len().saturating_sub(KEEP);
    let start = (start..log.len()).find(|i| log.is_char_boundary(*i)).unwrap_or(log.len());
    let mut tail = if start > 0 { format!("[... {start} bytes before ...]\n") } else { String::new() };
    for line in log[start..].lines() {
        match line.char_indices().nth(LINE) {
            Some((cut, _)) => tail.push_str(&format!("{} [... {} bytes more]\n", &line[..cut], line.len() - cut)),
            None => {
                tail.push_str(line);
                tail.push('\n');
            }
        }
    }
    tail
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}
