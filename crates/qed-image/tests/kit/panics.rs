//! Panics caught with `catch_unwind`, as text.

use std::any::Any;

/// The message a caught panic carried (empty if it was neither a `String` nor a `&str`).
pub fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .unwrap_or_default(),
    }
}
