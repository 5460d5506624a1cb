"""kvstore store: the one key module, the chunk format and the tiered store."""
