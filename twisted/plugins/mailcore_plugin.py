from twisted.application.service import ServiceMaker

mailcore = ServiceMaker(
    "mailcore",
    "mailcore.service",
    "Mail gateway: SMTP MX relay, IMAP/POP fetch clients and the HTTP admin APIs.",
    "mailcore",
)
