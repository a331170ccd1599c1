"""Extra, user-composable ds2oai middleware, loaded from the config by "module:attr"."""
