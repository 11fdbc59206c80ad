"""tftpd: a TFTP server compatible with AIX tftpd (inetd subserver with
/etc/tftpaccess.ctl access control) that also runs standalone or as a daemon."""

__version__ = "0.1.0"
