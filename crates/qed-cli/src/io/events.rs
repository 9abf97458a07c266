//! What qemu-io's main loop does between commands: asynchronous requests (`aio_read`,
//! `aio_write`) run on threads against the shared image and report back here, in the order
//! they complete; their lines are printed when the main thread next waits (for I/O, for
//! `aio_flush`, `sleep`, the next line of stdin, or the end), as qemu-io prints them when its
//! main loop runs. Lines of stdin come through the same channel from a reader thread, so that
//! completions print while an interactive session waits for input.

use std::collections::VecDeque;
use std::io::{BufRead, Read};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

use super::console::Console;

/// Longest line qemu-io reads at once (`fgets` into 1024 bytes); longer lines are split.
const MAX_LINE: usize = 1023;

/// What an asynchronous request prints when it completes.
#[derive(Debug, Default)]
pub struct Completion {
    /// Its stdout lines.
    pub out: String,
    /// Its detail for stderr (see [`Console::detail`]).
    pub detail: Option<String>,
}

enum Event {
    Done(Completion),
    /// A line of stdin, or its end.
    Line(Option<String>),
}

/// Requests in flight and lines read ahead.
pub struct Events {
    tx: Sender<Event>,
    rx: Receiver<Event>,
    in_flight: usize,
    lines: VecDeque<Option<String>>,
    reading: bool,
}

impl Default for Events {
    fn default() -> Self {
        let (tx, rx) = channel();
        Self {
            tx,
            rx,
            in_flight: 0,
            lines: VecDeque::new(),
            reading: false,
        }
    }
}

impl Events {
    /// Runs `request` on a thread of its own; what it returns is printed when it completes.
    /// The closure must drop what it holds of the image before it returns, so that a close
    /// after the completion finds the image unshared.
    pub fn submit(&mut self, request: impl FnOnce() -> Completion + Send + 'static) {
        let tx = self.tx.clone();
        self.in_flight += 1;
        let spawned = std::thread::Builder::new()
            .name("qed-io-aio".into())
            .spawn(move || {
                let completion = request();
                let _ = tx.send(Event::Done(completion));
            });
        if let Err(e) = spawned {
            // No thread to be had: the request never ran.
            self.in_flight -= 1;
            let _ = self.tx.send(Event::Done(Completion {
                out: format!("aio request failed: {e}\n"),
                detail: None,
            }));
        }
    }

    fn handle(&mut self, event: Event, con: &mut Console<'_>) {
        match event {
            Event::Done(done) => {
                self.in_flight = self.in_flight.saturating_sub(1);
                con.out(&done.out);
                if let Some(detail) = done.detail {
                    con.detail(&detail);
                }
            }
            Event::Line(line) => self.lines.push_back(line),
        }
    }

    /// Prints the completions that have arrived, without waiting.
    pub fn poll(&mut self, con: &mut Console<'_>) {
        loop {
            match self.rx.try_recv() {
                Ok(event) => self.handle(event, con),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            }
        }
    }

    /// Waits for every request in flight, printing each completion.
    pub fn drain(&mut self, con: &mut Console<'_>) {
        self.poll(con);
        while self.in_flight > 0 {
            match self.rx.recv() {
                Ok(event) => self.handle(event, con),
                Err(_) => return,
            }
        }
    }

    /// Waits `duration`, printing completions as they come.
    pub fn sleep(&mut self, duration: Duration, con: &mut Console<'_>) {
        let deadline = Instant::now() + duration;
        loop {
            let now = Instant::now();
            if now >= deadline {
                self.poll(con);
                return;
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(event) => self.handle(event, con),
                Err(RecvTimeoutError::Timeout) => {}
                // Never: this holds a sender.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(deadline - now),
            }
        }
    }

    /// Waits forever, printing completions (qemu-io's `wait_break` without a breakpoint).
    pub fn wait_forever(&mut self, con: &mut Console<'_>) -> ! {
        loop {
            match self.rx.recv() {
                Ok(event) => self.handle(event, con),
                Err(_) => std::thread::park(),
            }
        }
    }

    /// The next line of stdin (None at its end), printing completions while waiting.
    pub fn next_line(&mut self, con: &mut Console<'_>) -> Option<String> {
        if !self.reading {
            self.reading = true;
            let tx = self.tx.clone();
            let spawned = std::thread::Builder::new()
                .name("qed-io-stdin".into())
                .spawn(move || read_lines(&tx));
            if spawned.is_err() {
                return None;
            }
        }
        loop {
            if let Some(line) = self.lines.pop_front() {
                return line;
            }
            match self.rx.recv() {
                Ok(event) => self.handle(event, con),
                Err(_) => return None,
            }
        }
    }
}

/// Sends the lines of stdin as qemu-io reads them (at most [`MAX_LINE`] bytes at once, the
/// newline dropped), then its end.
fn read_lines(tx: &Sender<Event>) {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    loop {
        let mut bytes = Vec::new();
        let read = (&mut input)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut bytes);
        match read {
            Ok(0) | Err(_) => {
                let _ = tx.send(Event::Line(None));
                return;
            }
            Ok(_) => {
                if bytes.last() == Some(&b'\n') {
                    bytes.pop();
                }
                let line = String::from_utf8_lossy(&bytes).into_owned();
                if tx.send(Event::Line(Some(line))).is_err() {
                    return;
                }
            }
        }
    }
}
