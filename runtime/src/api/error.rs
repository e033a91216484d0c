//! The one error type of the app API.

use crate::backend::BackendError;
use crate::elastic::{CatalogError, CostModelError, ElasticError, SelectError};
use crate::tokenizer::{TemplateError, TokenizerError};
use crate::{ModelError, SubmodelError};

/// Errors of [`Engine`](super::Engine) and [`Session`](super::Session). Each prints as one line
/// that says what is wrong; the engine and its sessions stay usable after any of them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument is out of range or malformed (sampling values, sizes, names).
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What is wrong, naming the argument.
        what: String,
    },
    /// The prompt does not fit the session's context.
    #[error("the prompt needs {needed} tokens but the session holds at most {limit}; shorten it, reset the session, or allow truncation")]
    ContextFull {
        /// Tokens the call needs in the cache.
        needed: usize,
        /// The session's context length.
        limit: usize,
    },
    /// No submodel fits the budget.
    #[error(transparent)]
    NothingFits(#[from] SelectError),
    /// The model file could not be opened or read.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The submodel does not exist in this file.
    #[error(transparent)]
    Submodel(#[from] SubmodelError),
    /// The stored catalog is unreadable.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The tokenizer failed or is missing.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The chat template failed (its own `raise_exception` message included).
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The CPU engine or the GPU failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The latency cost model could not be calibrated, loaded or used.
    #[error(transparent)]
    CostModel(#[from] CostModelError),
    /// [`Engine::close`](super::Engine::close) was called: the engine's weights are released
    /// and no session of it can run.
    #[error("the engine was closed; open it again to generate")]
    EngineClosed,
}

impl Error {
    /// An [`Error::InvalidArgument`].
    pub(crate) fn invalid(what: impl Into<String>) -> Error {
        Error::InvalidArgument { what: what.into() }
    }
}

impl From<ElasticError> for Error {
    fn from(e: ElasticError) -> Error {
        match e {
            ElasticError::Cpu(e) => Error::Backend(BackendError::Cpu(e)),
            #[cfg(feature = "gpu")]
            ElasticError::Gpu(e) => Error::Backend(BackendError::Gpu(e)),
            ElasticError::Model(e) => Error::Model(e),
        }
    }
}

impl From<crate::sampling::SamplingError> for Error {
    fn from(e: crate::sampling::SamplingError) -> Error {
        Error::invalid(e.to_string())
    }
}
