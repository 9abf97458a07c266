//! The fixed-newstyle handshake as a state machine: bytes from the client in, actions out.
//! It never touches a socket; the server feeds it what it reads and does what it says.

use super::config::{ExportConfig, Mode, TlsMode};
use super::consts::*;
use super::error::ProtoError;
use super::option::{
    error_reply, info_block_size, info_export, info_string, match_query, meta_context_data,
    option_reply, parse_info_request, parse_meta_request, server_data, Invalid, MetaContext,
};
use super::wire::{Cursor, PutBe};

/// Largest option payload buffered. Larger options are skipped as they arrive (never held in
/// memory) and answered with an error: an export name and 14 queries of the longest string
/// fit.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Most options one negotiation may send before the server hangs up.
pub const MAX_OPTIONS: u32 = 1024;

/// What a finished handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Request and reply headers.
    pub mode: Mode,
    /// Selected metadata contexts (for `NBD_CMD_BLOCK_STATUS`).
    pub contexts: Vec<MetaContext>,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// Whether the client asked for block sizes with `NBD_OPT_GO` (and so promised to obey
    /// them).
    pub block_size_requested: bool,
    /// Bytes that arrived after the option that ended the handshake: the first requests.
    pub leftover: Vec<u8>,
}

/// What the server must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes to the client.
    Send(Vec<u8>),
    /// Upgrade the connection to TLS now (after sending what came before); `leftover` is what
    /// the client already sent past the option (the start of its TLS handshake).
    StartTls {
        /// Bytes already received after `NBD_OPT_STARTTLS`.
        leftover: Vec<u8>,
    },
    /// The client aborted the negotiation: close the connection.
    Abort,
    /// Transmission starts.
    Done(Negotiated),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32, len: usize },
    Skipping { option: u32, remaining: u64 },
    Finished,
}

/// The handshake of one connection.
#[derive(Debug)]
pub struct Handshake {
    config: ExportConfig,
    state: State,
    buf: Vec<u8>,
    options: u32,
    fixed: bool,
    no_zeroes: bool,
    mode: Mode,
    contexts: Vec<MetaContext>,
    tls_active: bool,
}

impl Handshake {
    /// A handshake for `config`; send [`Handshake::greeting`] first.
    pub fn new(config: ExportConfig) -> Self {
        Self {
            config,
            state: State::ClientFlags,
            buf: Vec::new(),
            options: 0,
            fixed: false,
            no_zeroes: false,
            mode: Mode::Simple,
            contexts: Vec::new(),
            tls_active: false,
        }
    }

    /// What the server sends as soon as the client connects.
    pub fn greeting(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(18);
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        out
    }

    /// Whether the handshake has ended (done or aborted).
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// How many more bytes the current step needs at least (a read-size hint).
    pub fn wants(&self) -> usize {
        let need = match self.state {
            State::ClientFlags => 4,
            State::OptionHeader => 16,
            State::OptionData { len, .. } => len,
            State::Skipping { remaining, .. } => {
                return usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .clamp(1, 1 << 16)
            }
            State::Finished => return 0,
        };
        need.saturating_sub(self.buf.len()).max(1)
    }

    /// Feeds bytes from the client; returns what to do, in order.
    pub fn on_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Action>, ProtoError> {
        if self.state == State::Finished {
            return Err(ProtoError::HandshakeOver);
        }
        let mut actions = Vec::new();
        let mut input = bytes;
        loop {
            if let State::Skipping { option, remaining } = self.state {
                // Oversized options are dropped as they arrive, never buffered.
                let n = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                input = &input[n..];
                let remaining = remaining - n as u64;
                if remaining > 0 {
                    self.state = State::Skipping { option, remaining };
                    return Ok(actions);
                }
                self.state = State::OptionHeader;
                actions.push(Action::Send(self.oversized_reply(option)?));
                continue;
            }
            let need = match self.state {
                State::ClientFlags => 4,
                State::OptionHeader => 16,
                State::OptionData { len, .. } => len,
                State::Skipping { .. } => unreachable!("handled above"),
                State::Finished => {
                    // What follows the end of the handshake belongs to transmission.
                    if let Some(Action::Done(n)) = actions.last_mut() {
                        n.leftover.extend_from_slice(&self.buf);
                        n.leftover.extend_from_slice(input);
                        self.buf.clear();
                    }
                    return Ok(actions);
                }
            };
            if self.buf.len() < need {
                let take = (need - self.buf.len()).min(input.len());
                self.buf.extend_from_slice(&input[..take]);
                input = &input[take..];
                if self.buf.len() < need {
                    return Ok(actions);
                }
            }
            let message = std::mem::take(&mut self.buf);
            self.step(&message, &mut actions)?;
            if let Some(Action::StartTls { leftover }) = actions.last_mut() {
                leftover.extend_from_slice(input);
                return Ok(actions);
            }
        }
    }

    fn step(&mut self, message: &[u8], actions: &mut Vec<Action>) -> Result<(), ProtoError> {
        let mut c = Cursor::new(message);
        match self.state {
            State::ClientFlags => {
                let flags = c.u32().unwrap_or(0);
                if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    return Err(ProtoError::UnknownClientFlags { flags });
                }
                self.fixed = flags & FLAG_C_FIXED_NEWSTYLE != 0;
                self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                self.state = State::OptionHeader;
            }
            State::OptionHeader => {
                let magic = c.u64().unwrap_or(0);
                let option = c.u32().unwrap_or(0);
                let len = c.u32().unwrap_or(0);
                if magic != IHAVEOPT {
                    return Err(ProtoError::BadOptionMagic { magic });
                }
                self.options += 1;
                if self.options > MAX_OPTIONS {
                    return Err(ProtoError::TooManyOptions { limit: MAX_OPTIONS });
                }
                self.state = if len > MAX_OPTION_LEN {
                    if option == OPT_EXPORT_NAME {
                        // It cannot be answered with an error, and no name is that long.
                        return Err(ProtoError::NameTooLong {
                            len,
                            limit: MAX_STRING_LEN,
                        });
                    }
                    State::Skipping {
                        option,
                        remaining: u64::from(len),
                    }
                } else {
                    State::OptionData {
                        option,
                        len: len as usize,
                    }
                };
            }
            State::OptionData { option, .. } => {
                self.state = State::OptionHeader;
                self.option(option, message, actions)?;
            }
            State::Skipping { .. } | State::Finished => {}
        }
        Ok(())
    }

    /// The answer to an option too large to hold.
    fn oversized_reply(&self, option: u32) -> Result<Vec<u8>, ProtoError> {
        let error = if self.tls_required_now() && option != OPT_STARTTLS && option != OPT_ABORT {
            REP_ERR_TLS_REQD
        } else if known_option(option) {
            REP_ERR_TOO_BIG
        } else {
            REP_ERR_UNSUP
        };
        Ok(error_reply(option, error, "option data too large"))
    }

    fn tls_required_now(&self) -> bool {
        self.config.tls == TlsMode::Required && !self.tls_active
    }

    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        actions: &mut Vec<Action>,
    ) -> Result<(), ProtoError> {
        let send = |actions: &mut Vec<Action>, bytes| actions.push(Action::Send(bytes));
        if self.tls_required_now() && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Err(ProtoError::OptionNotAllowed {
                    option,
                    why: "TLS is required first",
                });
            }
            send(
                actions,
                error_reply(option, REP_ERR_TLS_REQD, "TLS is required"),
            );
            return Ok(());
        }
        match option {
            OPT_EXPORT_NAME => return self.export_name(data, actions),
            OPT_ABORT => {
                send(actions, option_reply(option, REP_ACK, &[]));
                actions.push(Action::Abort);
                self.state = State::Finished;
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send(actions, invalid(option, "LIST takes no data"));
                } else {
                    let d = server_data(&self.config.name, self.config.description.as_deref());
                    send(actions, option_reply(option, REP_SERVER, &d));
                    send(actions, option_reply(option, REP_ACK, &[]));
                }
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    send(actions, invalid(option, "STARTTLS takes no data"));
                } else if self.tls_active {
                    send(actions, invalid(option, "TLS is already active"));
                } else if self.config.tls == TlsMode::Off || !self.fixed {
                    send(
                        actions,
                        error_reply(option, REP_ERR_POLICY, "TLS is not enabled on this server"),
                    );
                } else {
                    send(actions, option_reply(option, REP_ACK, &[]));
                    // Nothing negotiated before TLS survives it.
                    self.mode = Mode::Simple;
                    self.contexts.clear();
                    self.tls_active = true;
                    actions.push(Action::StartTls {
                        leftover: Vec::new(),
                    });
                }
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, actions),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send(actions, invalid(option, "STRUCTURED_REPLY takes no data"));
                } else if self.mode == Mode::Extended {
                    send(
                        actions,
                        error_reply(
                            option,
                            REP_ERR_EXT_HEADER_REQD,
                            "extended headers are already negotiated",
                        ),
                    );
                } else if self.mode == Mode::Structured {
                    send(
                        actions,
                        invalid(option, "structured replies already negotiated"),
                    );
                } else {
                    self.mode = Mode::Structured;
                    send(actions, option_reply(option, REP_ACK, &[]));
                }
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    send(actions, invalid(option, "EXTENDED_HEADERS takes no data"));
                } else if self.mode == Mode::Extended {
                    send(
                        actions,
                        invalid(option, "extended headers already negotiated"),
                    );
                } else {
                    self.mode = Mode::Extended;
                    send(actions, option_reply(option, REP_ACK, &[]));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta(option, data, actions),
            _ => send(
                actions,
                error_reply(option, REP_ERR_UNSUP, "option not supported"),
            ),
        }
        Ok(())
    }

    fn export_name(&mut self, data: &[u8], actions: &mut Vec<Action>) -> Result<(), ProtoError> {
        if self.mode == Mode::Extended {
            return Err(ProtoError::OptionNotAllowed {
                option: OPT_EXPORT_NAME,
                why: "EXPORT_NAME after extended headers",
            });
        }
        if data.len() > MAX_STRING_LEN {
            return Err(ProtoError::NameTooLong {
                len: data.len() as u32,
                limit: MAX_STRING_LEN,
            });
        }
        if data != self.config.name.as_bytes() {
            return Err(ProtoError::UnknownExport {
                name: String::from_utf8_lossy(data).into_owned(),
            });
        }
        let flags = self.config.transmission_flags(self.mode);
        let mut out = Vec::with_capacity(134);
        out.put_u64(self.config.size);
        out.put_u16(flags);
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        actions.push(Action::Send(out));
        self.finish(flags, false, actions);
        Ok(())
    }

    fn finish(&mut self, flags: u16, block_size_requested: bool, actions: &mut Vec<Action>) {
        self.state = State::Finished;
        actions.push(Action::Done(Negotiated {
            mode: self.mode,
            contexts: std::mem::take(&mut self.contexts),
            flags,
            block_size_requested,
            leftover: Vec::new(),
        }));
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], actions: &mut Vec<Action>) {
        let request = match parse_info_request(data) {
            Ok(r) => r,
            Err(Invalid(why)) => {
                actions.push(Action::Send(invalid(option, why)));
                return;
            }
        };
        if request.name != self.config.name.as_bytes() {
            actions.push(Action::Send(error_reply(
                option,
                REP_ERR_UNKNOWN,
                "no export of that name",
            )));
            return;
        }
        let flags = self.config.transmission_flags(self.mode);
        let info = |data: Vec<u8>| Action::Send(option_reply(option, REP_INFO, &data));
        actions.push(info(info_export(self.config.size, flags)));
        if request.wants(INFO_NAME) {
            actions.push(info(info_string(INFO_NAME, &self.config.name)));
        }
        if let (true, Some(d)) = (
            request.wants(INFO_DESCRIPTION),
            self.config.description.as_deref(),
        ) {
            actions.push(info(info_string(INFO_DESCRIPTION, d)));
        }
        let b = self.config.block_size;
        actions.push(info(info_block_size(b.minimum, b.preferred, b.maximum)));
        actions.push(Action::Send(option_reply(option, REP_ACK, &[])));
        if option == OPT_GO {
            self.finish(flags, request.wants(INFO_BLOCK_SIZE), actions);
        }
    }

    fn meta(&mut self, option: u32, data: &[u8], actions: &mut Vec<Action>) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection, even when it fails.
            self.contexts.clear();
        }
        if self.mode == Mode::Simple {
            actions.push(Action::Send(invalid(
                option,
                "negotiate structured replies first",
            )));
            return;
        }
        let request = match parse_meta_request(data) {
            Ok(r) => r,
            Err(Invalid(why)) => {
                actions.push(Action::Send(invalid(option, why)));
                return;
            }
        };
        if request.name != self.config.name.as_bytes() {
            actions.push(Action::Send(error_reply(
                option,
                REP_ERR_UNKNOWN,
                "no export of that name",
            )));
            return;
        }
        let offered = self.config.contexts();
        let mut found: Vec<MetaContext> = Vec::new();
        if request.queries.is_empty() && !set {
            found = offered.clone();
        }
        for query in &request.queries {
            match match_query(query, !set, &offered) {
                Ok(contexts) => {
                    for c in contexts {
                        if !found.contains(&c) {
                            found.push(c);
                        }
                    }
                }
                Err(Invalid(why)) => {
                    actions.push(Action::Send(invalid(option, why)));
                    return;
                }
            }
        }
        for &c in &found {
            // Ids in LIST replies are reserved (zero); SET gives each context its id.
            let id = if set { c.id() } else { 0 };
            actions.push(Action::Send(option_reply(
                option,
                REP_META_CONTEXT,
                &meta_context_data(id, c),
            )));
        }
        actions.push(Action::Send(option_reply(option, REP_ACK, &[])));
        if set {
            self.contexts = found;
        }
    }
}

fn invalid(option: u32, why: &str) -> Vec<u8> {
    error_reply(option, REP_ERR_INVALID, why)
}

fn known_option(option: u32) -> bool {
    matches!(
        option,
        OPT_EXPORT_NAME
            | OPT_ABORT
            | OPT_LIST
            | OPT_STARTTLS
            | OPT_INFO
            | OPT_GO
            | OPT_STRUCTURED_REPLY
            | OPT_LIST_META_CONTEXT
            | OPT_SET_META_CONTEXT
            | OPT_EXTENDED_HEADERS
    )
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
