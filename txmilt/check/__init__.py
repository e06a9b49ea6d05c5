"""txmilt-check: ask a milter what it would do to a message, as an MTA would, and put it under load.

``txmilt-check inet:8891@127.0.0.1 message.eml`` plays one SMTP conversation
to the milter with the macros of a Postfix (or Sendmail) profile and shows
each stage's reply, the verdict, every change and the resulting message.
Modules: ``options`` (the command line), ``message`` (the message file),
``play`` (the conversation over sockets), ``report`` and ``text`` (what is
printed), ``load`` (the load mode), ``status`` (exit statuses), ``command``
(the entry point).
"""
