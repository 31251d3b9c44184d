"""Packaging for Mailcore, a mail gateway daemon on Twisted."""

from setuptools import find_packages, setup

setup(
    name="mailcore",
    version="0.1.0",
    description="Mail gateway daemon: SMTP MX relay, fetch clients and HTTP admin APIs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # An explicit root package_dir makes `pip install -e .` a plain .pth of the project root,
    # which twisted.plugins needs to find twisted/plugins/ (setuptools' import-hook finder
    # for other layouts hides it).
    package_dir={"": "."},
    packages=[
        *find_packages(include=["mailcore", "mailcore.*", "web", "web.*", "filters", "filters.*"]),
        "mailcore.store.migrations",
        "mailcore.store.migrations.versions",
        "twisted.plugins",
    ],
    # The HTML pages' templates and stylesheet (web.pages): the daemon reads them at run time.
    package_data={
        "mailcore.store.migrations": ["script.py.mako"],
        "web.pages": ["templates/*.html", "static/*.css"],
    },
    include_package_data=True,
    install_requires=[
        "twisted[tls]>=24.7.0",
        "klein>=24.8.0",
        "treq>=24.9.1",
        "pyopenssl>=24.2.1",
        "service-identity>=24.1.0",
        "cryptography>=43.0.0",
        "sqlalchemy>=2.0.30",
        "alembic>=1.13.0",
        "argon2-cffi>=23.1.0",
        "psycopg[binary]>=3.2.0",
        "prometheus-client>=0.20.0",
        "fpdf2>=2.7.0",
        "idna>=3.7",
        # The OAuth 2 provider of Dropmyemail (mailcore/oauth).
        "oauthlib>=3.2.2",
        # Dropmyemail's attachment descriptions (libmagic, Debian's libmagic1).
        "python-magic>=0.4.27",
        # Dropmyemail's contacts as vCards.
        "vobject>=0.9.7",
        # Telephone numbers in signature blocks (Dropmyemail's contacts): libphonenumber.
        "phonenumberslite>=8.13",
        # safedrop uploads: a streaming multipart/form-data parser
        "multipart>=1.2.0",
        "jinja2>=3.1",
        # JSON replies: the message lists encode 50-100 objects a request (15 x json's speed).
        "orjson>=3.10",
    ],
    extras_require={
        # schemathesis: the property-based fuzz of the HTTP APIs (tests/test_web_fuzz.py).
        "test": ["hypothesis>=6.100.0", "schemathesis>=4.0", "selenium>=4.20"],
        "dev": [
            "ruff>=0.6.0",
            "mypy>=1.11.0",
            "mypy-zope>=1.0.0",
            "hypothesis>=6.100.0",
            "selenium>=4.20",
            "schemathesis>=4.0",
        ],
    },
    entry_points={"console_scripts": ["mailcore = mailcore.cli:main"]},
)
