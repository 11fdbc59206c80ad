from setuptools import setup

setup(
    name="tftpd",
    version="0.1.0",
    description="TFTP server compatible with AIX tftpd (inetd subserver, tftpaccess.ctl)",
    packages=["tftpd"],
    python_requires=">=3.9",
    install_requires=["python-daemon>=3.0", "lockfile>=0.12"],
    extras_require={"test": ["pytest", "hypothesis",
                             # STYLE.md: the package passes mypy --strict (tests/test_typing.py)
                             "mypy",
                             # the fuzz harness; wheels exist for x86_64 only
                             'atheris; platform_machine == "x86_64"']},
    entry_points={"console_scripts": ["tftpd = tftpd.main:main"]},
    data_files=[("share/man/man8", ["man/tftpd.8"])],
)
