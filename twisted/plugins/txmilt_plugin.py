from twisted.application.service import ServiceMaker

txmilt = ServiceMaker("txmilt", "txmilt.tap", "Run a chain of mail filters (milters).", "milter")
