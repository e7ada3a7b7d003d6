//! Placeholder: the SDK lands with issue 3.
