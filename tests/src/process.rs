//! Processes inside pods and nodes: spawned with their network namespace
//! (and cgroup) set between fork and exec, killed on drop.

use std::{
    ffi::CString,
    fs::File,
    io::{BufRead, BufReader},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::{Child, ChildStdout, Command},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

/// Makes `command` start in the namespace at `netns` and, when given, in
/// the cgroup at `cgroup` (so sock_ops sees its sockets).
pub fn enter(command: &mut Command, netns: &Path, cgroup: Option<&Path>) {
    let netns = File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
    let procs = cgroup.map(|c| {
        CString::new(c.join("cgroup.procs").into_os_string().into_encoded_bytes()).expect("path")
    });
    // SAFETY: the hook only makes async-signal-safe syscalls (setns, open,
    // write, close) on values prepared before fork.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Guarded {
    child: Option<Child>,
}

impl Guarded {
    pub fn new(child: Child) -> Self {
        Self { child: Some(child) }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    /// Gives the child up without killing it.
    pub fn into_inner(mut self) -> Child {
        self.child.take().expect("running")
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Lines a child prints, collected on a thread so the pipe never fills.
#[derive(Clone, Default)]
pub struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    /// Starts collecting; returns the collector and a receiver that sees
    /// each line as it arrives.
    pub fn collect(stdout: ChildStdout) -> (Self, mpsc::Receiver<String>) {
        let lines = Self::default();
        let (tx, rx) = mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lines.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        (lines, rx)
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until at least `count` lines arrived.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let lines = self.snapshot();
            if lines.len() >= count || std::time::Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
