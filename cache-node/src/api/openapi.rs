//! The OpenAPI 3.1 document of the client API, served at
//! `/api/v1/openapi.json`. Written by hand (cache-node/openapi.json, checked
//! in) rather than generated: the routes are parsed by one dispatcher, not
//! by annotated handlers a generator could read. That the server answers as
//! it says is tested, not assumed: cache-node/tests/openapi.rs checks that
//! the node serves exactly the checked-in file, validates it
//! (openapi-spec-validator) and runs schemathesis against a live node.

/// The document, byte for byte as in the repository.
pub const DOCUMENT: &str = include_str!("../../openapi.json");
