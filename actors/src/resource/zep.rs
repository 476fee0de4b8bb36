//! Zep client and actor (being written).
