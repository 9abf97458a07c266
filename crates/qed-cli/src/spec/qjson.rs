//! QEMU's JSON: RFC 8259 with strings in single quotes too (`{'driver': 'qed'}`, an
//! apostrophe escaped as `\'`), parsed as QEMU's lexer, streamer and parser parse it, with
//! their error messages (`JSON parse error, premature EOI`, `Expecting a JSON value`, ...).
//! Values come out as `serde_json::Value`.

use serde_json::{Map, Number, Value};

/// A token of QEMU's lexer.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    /// A string literal, as written (quotes and escapes included).
    Str(String),
    /// A number literal, as written.
    Number(String),
    /// `[a-z]+`: the parser accepts `true`, `false` and `null`.
    Keyword(String),
}

#[cfg(test)]
impl Token {
    fn text(&self) -> String {
        match self {
            Self::LCurly => "{".into(),
            Self::RCurly => "}".into(),
            Self::LSquare => "[".into(),
            Self::RSquare => "]".into(),
            Self::Colon => ":".into(),
            Self::Comma => ",".into(),
            Self::Str(s) | Self::Number(s) | Self::Keyword(s) => s.clone(),
        }
    }
}

/// What the lexer hands the streamer.
enum Lexed {
    Token(Token),
    /// Text that is no token: `JSON parse error, stray '...'`.
    Error(String),
}

/// Splits `text` into tokens as QEMU's lexer does; an error carries the text of the token it
/// interrupted, up to and including the offending character (or the end).
fn lex(text: &str) -> Vec<Lexed> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let single = match c {
            ' ' | '\t' | '\n' | '\r' => {
                i += 1;
                continue;
            }
            '{' => Some(Token::LCurly),
            '}' => Some(Token::RCurly),
            '[' => Some(Token::LSquare),
            ']' => Some(Token::RSquare),
            ':' => Some(Token::Colon),
            ',' => Some(Token::Comma),
            _ => None,
        };
        if let Some(token) = single {
            out.push(Lexed::Token(token));
            i += 1;
            continue;
        }
        let start = i;
        let (item, next) = match c {
            '"' | '\'' => lex_string(&chars, i),
            '-' | '0'..='9' => lex_number(&chars, i),
            'a'..='z' => {
                let mut j = i;
                while j < chars.len() && chars[j].is_ascii_lowercase() {
                    j += 1;
                }
                (
                    Lexed::Token(Token::Keyword(chars[i..j].iter().collect())),
                    j,
                )
            }
            _ => (Lexed::Error(c.to_string()), i + 1),
        };
        debug_assert!(next > start);
        out.push(item);
        i = next;
    }
    out
}

/// A string from its opening quote; returns the token (or the error) and where lexing goes
/// on.
fn lex_string(chars: &[char], start: usize) -> (Lexed, usize) {
    let quote = chars[start];
    let mut i = start + 1;
    let error = |end: usize| {
        let end = end.min(chars.len());
        (Lexed::Error(chars[start..end].iter().collect()), end)
    };
    loop {
        let Some(&c) = chars.get(i) else {
            return error(i);
        };
        match c {
            c if c == quote => {
                return (
                    Lexed::Token(Token::Str(chars[start..=i].iter().collect())),
                    i + 1,
                )
            }
            '\\' => match chars.get(i + 1) {
                Some('"' | '\'' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't') => i += 2,
                Some('u') => {
                    for k in 0..4 {
                        match chars.get(i + 2 + k) {
                            Some(h) if h.is_ascii_hexdigit() => {}
                            _ => return error(i + 3 + k),
                        }
                    }
                    i += 6;
                }
                // The parser rejects other escapes; the lexer passes them.
                Some(_) => i += 2,
                None => return error(i + 1),
            },
            c if (c as u32) < 0x20 => return error(i + 1),
            _ => i += 1,
        }
    }
}

/// A number from its first character: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`,
/// followed by something that cannot continue it.
fn lex_number(chars: &[char], start: usize) -> (Lexed, usize) {
    let mut i = start;
    let digit = |i: usize| chars.get(i).is_some_and(char::is_ascii_digit);
    let error = |end: usize| {
        let end = end.min(chars.len());
        (Lexed::Error(chars[start..end].iter().collect()), end)
    };
    if chars[i] == '-' {
        i += 1;
    }
    match chars.get(i) {
        Some('0') => {
            i += 1;
            if digit(i) {
                return error(i + 1);
            }
        }
        Some('1'..='9') => {
            while digit(i) {
                i += 1;
            }
        }
        _ => return error(i + 1),
    }
    if chars.get(i) == Some(&'.') {
        i += 1;
        if !digit(i) {
            return error(i + 1);
        }
        while digit(i) {
            i += 1;
        }
    }
    if matches!(chars.get(i), Some('e' | 'E')) {
        i += 1;
        if matches!(chars.get(i), Some('+' | '-')) {
            i += 1;
        }
        if !digit(i) {
            return error(i + 1);
        }
        while digit(i) {
            i += 1;
        }
    }
    (
        Lexed::Token(Token::Number(chars[start..i].iter().collect())),
        i,
    )
}

/// The parser over one value's tokens.
struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

type Parsed<T> = Result<T, String>;

fn parse_error(what: &str) -> String {
    format!("JSON parse error, {what}")
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn pop(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.pos).cloned();
        if token.is_some() {
            self.pos += 1;
        }
        token
    }

    fn value(&mut self) -> Parsed<Value> {
        match self.peek() {
            None => Err(parse_error("premature EOI")),
            Some(Token::LCurly) => self.object(),
            Some(Token::LSquare) => self.array(),
            Some(Token::Str(_) | Token::Number(_)) => self.literal(),
            Some(Token::Keyword(_)) => self.keyword(),
            Some(_) => Err(parse_error("expecting value")),
        }
    }

    fn object(&mut self) -> Parsed<Value> {
        self.pop();
        let mut map = Map::new();
        match self.peek() {
            None => return Err(parse_error("premature EOI")),
            Some(Token::RCurly) => {
                self.pop();
                return Ok(Value::Object(map));
            }
            Some(_) => {}
        }
        self.pair(&mut map)?;
        loop {
            match self.pop() {
                None => return Err(parse_error("premature EOI")),
                Some(Token::RCurly) => return Ok(Value::Object(map)),
                Some(Token::Comma) => self.pair(&mut map)?,
                Some(_) => return Err(parse_error("expected separator in dict")),
            }
        }
    }

    fn pair(&mut self, map: &mut Map<String, Value>) -> Parsed<()> {
        if self.peek().is_none() {
            return Err(parse_error("premature EOI"));
        }
        let key = match self.value()? {
            Value::String(key) => key,
            _ => return Err(parse_error("key is not a string in object")),
        };
        match self.pop() {
            None => return Err(parse_error("premature EOI")),
            Some(Token::Colon) => {}
            Some(_) => return Err(parse_error("missing : in object pair")),
        }
        let value = self.value()?;
        if map.contains_key(&key) {
            return Err(parse_error("duplicate key"));
        }
        map.insert(key, value);
        Ok(())
    }

    fn array(&mut self) -> Parsed<Value> {
        self.pop();
        let mut list = Vec::new();
        match self.peek() {
            None => return Err(parse_error("premature EOI")),
            Some(Token::RSquare) => {
                self.pop();
                return Ok(Value::Array(list));
            }
            Some(_) => {}
        }
        list.push(self.value()?);
        loop {
            match self.pop() {
                None => return Err(parse_error("premature EOI")),
                Some(Token::RSquare) => return Ok(Value::Array(list)),
                Some(Token::Comma) => list.push(self.value()?),
                Some(_) => return Err(parse_error("expected separator in list")),
            }
        }
    }

    fn keyword(&mut self) -> Parsed<Value> {
        let Some(Token::Keyword(word)) = self.pop() else {
            return Err(parse_error("expecting value"));
        };
        match word.as_str() {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            "null" => Ok(Value::Null),
            _ => Err(parse_error(&format!("invalid keyword '{word}'"))),
        }
    }

    fn literal(&mut self) -> Parsed<Value> {
        match self.pop() {
            Some(Token::Str(text)) => unescape(&text).map(Value::String),
            Some(Token::Number(text)) => Ok(number(&text)),
            _ => Err(parse_error("expecting value")),
        }
    }
}

/// A number as QEMU keeps it: a signed integer if it fits, an unsigned one, else a double.
fn number(text: &str) -> Value {
    if let Ok(n) = text.parse::<i64>() {
        return Value::Number(n.into());
    }
    if let Ok(n) = text.parse::<u64>() {
        return Value::Number(n.into());
    }
    text.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// The contents of a string literal (quotes removed, escapes resolved).
fn unescape(literal: &str) -> Parsed<String> {
    let inner: Vec<char> = literal.chars().collect();
    let inner = &inner[1..inner.len() - 1];
    let mut out = String::new();
    let mut i = 0;
    let hex = |i: usize| -> u32 {
        inner[i..i + 4]
            .iter()
            .fold(0, |acc, c| acc * 16 + c.to_digit(16).unwrap_or(0))
    };
    while i < inner.len() {
        let c = inner[i];
        if c != '\\' {
            out.push(c);
            i += 1;
            continue;
        }
        let e = inner.get(i + 1).copied().unwrap_or('\0');
        i += 2;
        let simple = match e {
            '"' => Some('"'),
            '\'' => Some('\''),
            '\\' => Some('\\'),
            '/' => Some('/'),
            'b' => Some('\u{8}'),
            'f' => Some('\u{c}'),
            'n' => Some('\n'),
            'r' => Some('\r'),
            't' => Some('\t'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            continue;
        }
        if e != 'u' {
            return Err(parse_error("invalid escape sequence in string"));
        }
        let start = i - 2;
        let mut cp = hex(i);
        i += 4;
        if (0xD800..=0xDBFF).contains(&cp)
            && inner.get(i) == Some(&'\\')
            && inner.get(i + 1) == Some(&'u')
            && inner.len() >= i + 6
        {
            let trailing = hex(i + 2);
            if (0xDC00..=0xDFFF).contains(&trailing) {
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (trailing & 0x3FF);
                i += 6;
            }
        }
        // QEMU's modified UTF-8 encodes U+0000 as two bytes; a Rust string holds it as is.
        match char::from_u32(cp) {
            Some(c) => out.push(c),
            None => {
                let written: String = inner[start..i].iter().collect();
                return Err(parse_error(&format!(
                    "{written} is not a valid Unicode character"
                )));
            }
        }
    }
    Ok(out)
}

/// Parses `text` as exactly one JSON value, as QEMU's `qobject_from_json` does.
pub fn parse(text: &str) -> Result<Value, String> {
    // What the streamer emits, in order: values and errors.
    let mut emitted: Vec<Result<Value, String>> = Vec::new();
    let mut pending: Vec<Token> = Vec::new();
    let (mut braces, mut brackets) = (0i64, 0i64);
    let emit = |pending: &mut Vec<Token>, emitted: &mut Vec<Result<Value, String>>| {
        let mut parser = Parser {
            tokens: std::mem::take(pending),
            pos: 0,
        };
        emitted.push(parser.value());
    };
    for item in lex(text) {
        let token = match item {
            Lexed::Error(text) => {
                emitted.push(Err(parse_error(&format!("stray '{text}'"))));
                pending.clear();
                braces = 0;
                brackets = 0;
                continue;
            }
            Lexed::Token(token) => token,
        };
        match token {
            Token::LCurly => braces += 1,
            Token::RCurly => braces -= 1,
            Token::LSquare => brackets += 1,
            Token::RSquare => brackets -= 1,
            _ => {}
        }
        pending.push(token);
        if (braces > 0 || brackets > 0) && braces >= 0 && brackets >= 0 {
            continue;
        }
        emit(&mut pending, &mut emitted);
        braces = 0;
        brackets = 0;
    }
    if !pending.is_empty() {
        emit(&mut pending, &mut emitted);
    }
    // qobject_from_json: the first thing emitted decides, a second makes it an error.
    let mut result: Option<Value> = None;
    for item in emitted {
        match (item, result.is_some()) {
            (_, true) => return Err("Expecting at most one JSON value".into()),
            (Ok(value), false) => result = Some(value),
            (Err(e), false) => return Err(e),
        }
    }
    result.ok_or_else(|| "Expecting a JSON value".into())
}

/// The text of a token, for tests.
#[cfg(test)]
fn tokens(text: &str) -> Vec<String> {
    lex(text)
        .into_iter()
        .map(|l| match l {
            Lexed::Token(t) => t.text(),
            Lexed::Error(e) => format!("!{e}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn single_and_double_quotes_and_escapes() {
        assert_eq!(
            parse(r#"{'driver': 'qed', "file": {'filename': "a'b", 'x': 'c\'d\"\u0041'}}"#)
                .unwrap(),
            json!({"driver": "qed", "file": {"filename": "a'b", "x": "c'd\"A"}})
        );
        assert_eq!(
            parse("[1, -2, 3.5, 1e3, true, false, null, 18446744073709551615]").unwrap(),
            json!([
                1,
                -2,
                3.5,
                1000.0,
                true,
                false,
                null,
                18446744073709551615u64
            ])
        );
        assert_eq!(parse(r#""\ud83d\ude00""#).unwrap(), json!("\u{1F600}"));
        assert_eq!(tokens("{'a':01}"), ["{", "'a'", ":", "!01", "}"]);
    }

    #[test]
    fn errors_in_qemu_words() {
        for (text, why) in [
            ("{", "JSON parse error, premature EOI"),
            ("", "Expecting a JSON value"),
            ("   ", "Expecting a JSON value"),
            ("{@}", "JSON parse error, stray '@'"),
            (r#"{"a":tru}"#, "JSON parse error, invalid keyword 'tru'"),
            (
                r#"{"a":"b\x"}"#,
                "JSON parse error, invalid escape sequence in string",
            ),
            ("{'a':1}}", "Expecting at most one JSON value"),
            ("{'a':1} x", "Expecting at most one JSON value"),
            ("1 2", "Expecting at most one JSON value"),
            (
                r#"{"a":[1,2}"#,
                "JSON parse error, expected separator in list",
            ),
            (r#"{"a" 1}"#, "JSON parse error, missing : in object pair"),
            ("{1:2}", "JSON parse error, key is not a string in object"),
            (r#"{"a":}"#, "JSON parse error, expecting value"),
            (r#"{"a":1,}"#, "JSON parse error, expecting value"),
            (r#"{"a":1,"a":2}"#, "JSON parse error, duplicate key"),
            (
                "{'driver':'qed' 'file':1}",
                "JSON parse error, expected separator in dict",
            ),
            (r#"{"a":"b"#, r#"JSON parse error, stray '"b'"#),
            (r#"{"a":01}"#, "JSON parse error, stray '01'"),
            (r#"{"a":-}"#, "JSON parse error, stray '-}'"),
        ] {
            assert_eq!(parse(text).unwrap_err(), why, "{text}");
        }
    }
}
