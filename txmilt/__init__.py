"""txmilt: the Sendmail milter protocol on Twisted, with many filters per connection."""
