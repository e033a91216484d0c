//! The app-facing API: an [`Engine`] (one model file on one backend, shared) and
//! [`Session`]s (conversations) with sampling, streaming, stop strings, cancellation, token
//! counts, statistics and elastic switching. This is all an app (and the Kotlin and Swift
//! bindings) needs; the other modules are the machinery underneath.
//!
//! ```no_run
//! use matformer::{ChatMessage, Engine, EngineOptions, GenerateOptions, Input, SessionOptions, SinkControl};
//! # fn main() -> Result<(), matformer::Error> {
//! let engine = Engine::open("model.matf", EngineOptions::default())?;
//! let session = engine.session(SessionOptions::default())?;
//! let turn = Input::Chat(vec![ChatMessage { role: "user".into(), content: "Hi!".into() }]);
//! let answer = session.generate(turn, &GenerateOptions::default(), &mut |piece: &str| {
//!     print!("{piece}");
//!     SinkControl::Continue
//! })?;
//! println!("\n{} tokens, {:?}", answer.usage.completion_tokens, answer.finish_reason);
//! # Ok(()) }
//! ```

mod engine;
mod error;
mod session;
mod speculative;
mod types;

pub use engine::Engine;
pub use error::Error;
pub use session::{CancelHandle, Session};
pub use types::*;
