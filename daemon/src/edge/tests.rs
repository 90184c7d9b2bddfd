//! Integration tests of the edge.
