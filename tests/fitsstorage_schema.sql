-- FitsStorage's tables that spoolops's sample site package
-- (docs/examples/fitsstorage_site) reads and writes, as PostgreSQL DDL, for
-- tests/test_fitsstorage_pg.py.  Restated from their SQLAlchemy ORM classes
-- at GeminiDRSoftware/FitsStorage 426e1308 (server configuration:
-- is_server = True, not sqlite); when our research ran those classes with
-- SQLAlchemy 2.1 on PostgreSQL 15, a pg_dump -s of what their
-- metadata.create_all() made was identical to these tables:
--
--   fits_storage/core/orm/__init__.py            declarative_base, no naming convention
--   fits_storage/core/orm/file.py                file
--   fits_storage/core/orm/diskfile.py            diskfile
--   fits_storage/core/orm/header.py              header and its enum types
--   fits_storage/gemini_metadata_utils/telescope_instruments.py   the enums' values
--   fits_storage/queues/orm/ingestqueueentry.py  ingestqueue
--   fits_storage/queues/orm/fileopsqueueentry.py fileopsqueue
--   fits_storage/server/orm/fileuploadlog.py     fileuploadlog
--   fits_storage/server/orm/usagelog.py          usagelog (fileuploadlog's FK parent)
--   fits_storage/server/orm/user.py              users    (usagelog's FK parent)
--
-- There are no server-side defaults: their __init__ methods set every value
-- in Python (ingestqueue's fail_dt "not failed" = datetime.max =
-- '9999-12-31 23:59:59.999999'; added/after naive UTC).  Index names are
-- SQLAlchemy's ix_<table>_<column>; the others are PostgreSQL's defaults.

-- Enum types (header only). Values in declaration order.
CREATE TYPE procmode AS ENUM ('Failed', 'Raw', 'Quick-Look', 'Science-Quality', 'Quality-Assessment');
CREATE TYPE telescope AS ENUM ('Gemini-North', 'Gemini-South');
CREATE TYPE obstype AS ENUM ('DARK', 'ARC', 'FLAT', 'BIAS', 'OBJECT', 'PINHOLE', 'RONCHI', 'CAL', 'FRINGE', 'MASK', 'STANDARD', 'SLITILLUM', 'BPM');
CREATE TYPE obsclass AS ENUM ('dayCal', 'partnerCal', 'acqCal', 'acq', 'science', 'progCal', 'nightCal');
CREATE TYPE detector_gain_setting AS ENUM ('None', 'high', 'low', 'standard');
CREATE TYPE detector_readspeed_setting AS ENUM ('None', 'fast', 'medium', 'slow', 'standard', 'red:fast,blue:fast', 'red:fast,blue:medium', 'red:fast,blue:slow', 'red:medium,blue:fast', 'red:medium,blue:medium', 'red:medium,blue:slow', 'red:slow,blue:fast', 'red:slow,blue:medium', 'red:slow,blue:slow');
CREATE TYPE detector_welldepth_setting AS ENUM ('None', 'Shallow', 'Deep', 'Invalid');
CREATE TYPE mode AS ENUM ('imaging', 'spectroscopy', 'LS', 'MOS', 'IFS', 'IFP');
CREATE TYPE qa_state AS ENUM ('Fail', 'CHECK', 'Undefined', 'Usable', 'Pass');
CREATE TYPE reduction_state AS ENUM ('RAW', 'PREPARED', 'PROCESSED_FLAT', 'PROCESSED_BIAS', 'PROCESSED_FRINGE', 'PROCESSED_ARC', 'PROCESSED_DARK', 'PROCESSED_TELLURIC', 'PROCESSED_SCIENCE', 'PROCESSED_BPM', 'PROCESSED_STANDARD', 'PROCESSED_SLITILLUM', 'PROCESSED_PINHOLE', 'PROCESSED_UNKNOWN');

CREATE TABLE file (
    id SERIAL NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (id)
);
CREATE UNIQUE INDEX ix_file_name ON file (name);   -- unique=True+index=True => unique index, no separate constraint

CREATE TABLE diskfile (
    id SERIAL NOT NULL,
    file_id INTEGER NOT NULL,
    filename TEXT,
    path TEXT,
    present BOOLEAN,
    canonical BOOLEAN,
    file_md5 TEXT,
    file_size BIGINT,
    lastmod TIMESTAMP WITH TIME ZONE,
    entrytime TIMESTAMP WITH TIME ZONE,
    compressed BOOLEAN,
    data_md5 TEXT,
    data_size BIGINT,
    isfits BOOLEAN,
    fvwarnings INTEGER,
    fverrors INTEGER,
    mdready BOOLEAN,
    PRIMARY KEY (id),
    FOREIGN KEY (file_id) REFERENCES file (id)        -- constraint name diskfile_file_id_fkey
);
CREATE INDEX ix_diskfile_file_id ON diskfile (file_id);
CREATE INDEX ix_diskfile_filename ON diskfile (filename);
CREATE INDEX ix_diskfile_present ON diskfile (present);
CREATE INDEX ix_diskfile_canonical ON diskfile (canonical);
CREATE INDEX ix_diskfile_lastmod ON diskfile (lastmod);
CREATE INDEX ix_diskfile_entrytime ON diskfile (entrytime);

CREATE TABLE header (
    id SERIAL NOT NULL,
    diskfile_id INTEGER NOT NULL,
    program_id TEXT,
    engineering BOOLEAN,
    science_verification BOOLEAN,
    calibration_program BOOLEAN,
    processing procmode,
    processing_tag TEXT,
    observation_id TEXT,
    data_label TEXT,
    telescope telescope,
    instrument TEXT,
    ut_datetime TIMESTAMP WITHOUT TIME ZONE,
    ut_datetime_secs BIGINT,
    local_time TIME WITHOUT TIME ZONE,
    observation_type obstype,
    observation_class obsclass,
    object TEXT,
    ra NUMERIC(16, 12),
    "dec" NUMERIC(16, 12),
    azimuth NUMERIC(16, 12),
    elevation NUMERIC(16, 12),
    cass_rotator_pa NUMERIC(16, 12),
    airmass NUMERIC(8, 6),
    filter_name TEXT,
    exposure_time NUMERIC(12, 6),
    disperser TEXT,
    camera TEXT,
    central_wavelength NUMERIC(8, 6),
    wavelength_band TEXT,
    focal_plane_mask TEXT,
    pupil_mask TEXT,
    detector_binning TEXT,
    detector_roi_setting TEXT,
    detector_gain_setting detector_gain_setting,
    detector_readspeed_setting detector_readspeed_setting,
    detector_welldepth_setting detector_welldepth_setting,
    detector_readmode_setting TEXT,
    coadds INTEGER,
    spectroscopy BOOLEAN,
    mode mode,
    adaptive_optics BOOLEAN,
    laser_guide_star BOOLEAN,
    wavefront_sensor TEXT,
    gcal_lamp TEXT,
    raw_iq INTEGER,
    raw_cc INTEGER,
    raw_wv INTEGER,
    raw_bg INTEGER,
    requested_iq INTEGER,
    requested_cc INTEGER,
    requested_wv INTEGER,
    requested_bg INTEGER,
    qa_state qa_state,
    release DATE,
    reduction reduction_state,
    site_monitoring BOOLEAN,
    types TEXT,
    phot_standard BOOLEAN,
    proprietary_coordinates BOOLEAN,
    pre_image BOOLEAN,
    numpix INTEGER,                                    -- only when fsc.is_server (header.py:126-129)
    PRIMARY KEY (id),
    FOREIGN KEY (diskfile_id) REFERENCES diskfile (id) -- header_diskfile_id_fkey
);
CREATE INDEX ix_header_diskfile_id ON header (diskfile_id);
CREATE INDEX ix_header_program_id ON header (program_id);
CREATE INDEX ix_header_engineering ON header (engineering);
CREATE INDEX ix_header_science_verification ON header (science_verification);
CREATE INDEX ix_header_calibration_program ON header (calibration_program);
CREATE INDEX ix_header_processing_tag ON header (processing_tag);
CREATE INDEX ix_header_observation_id ON header (observation_id);
CREATE INDEX ix_header_data_label ON header (data_label);
CREATE INDEX ix_header_telescope ON header (telescope);
CREATE INDEX ix_header_instrument ON header (instrument);
CREATE INDEX ix_header_ut_datetime ON header (ut_datetime);
CREATE INDEX ix_header_ut_datetime_secs ON header (ut_datetime_secs);
CREATE INDEX ix_header_observation_type ON header (observation_type);
CREATE INDEX ix_header_observation_class ON header (observation_class);
CREATE INDEX ix_header_object ON header (object);
CREATE INDEX ix_header_ra ON header (ra);
CREATE INDEX ix_header_dec ON header ("dec");
CREATE INDEX ix_header_filter_name ON header (filter_name);
CREATE INDEX ix_header_disperser ON header (disperser);
CREATE INDEX ix_header_camera ON header (camera);
CREATE INDEX ix_header_central_wavelength ON header (central_wavelength);
CREATE INDEX ix_header_focal_plane_mask ON header (focal_plane_mask);
CREATE INDEX ix_header_pupil_mask ON header (pupil_mask);
CREATE INDEX ix_header_spectroscopy ON header (spectroscopy);
CREATE INDEX ix_header_mode ON header (mode);
CREATE INDEX ix_header_qa_state ON header (qa_state);
CREATE INDEX ix_header_reduction ON header (reduction);
CREATE INDEX ix_header_ut_datetime_desc_nullslast ON header (ut_datetime DESC NULLS LAST);  -- only when not using_sqlite

-- FK parents of fileuploadlog (needed only for FK integrity)
CREATE TABLE users (
    id SERIAL NOT NULL,
    orcid_id VARCHAR(20),
    noirlab_id TEXT,
    username TEXT NOT NULL,
    fullname TEXT,
    password TEXT,
    salt TEXT,
    email TEXT,
    gemini_staff BOOLEAN,
    misc_upload BOOLEAN,
    user_admin BOOLEAN,
    file_permission_admin BOOLEAN,
    instrument_team TEXT,
    superuser BOOLEAN,
    reset_token TEXT,
    reset_token_expires TIMESTAMP WITHOUT TIME ZONE,
    cookie TEXT,
    account_created TIMESTAMP WITHOUT TIME ZONE,
    password_changed TIMESTAMP WITHOUT TIME ZONE,
    last_login TIMESTAMP WITHOUT TIME ZONE,
    last_login_by TEXT,
    PRIMARY KEY (id)
);
CREATE INDEX ix_users_orcid_id ON users (orcid_id);
CREATE INDEX ix_users_noirlab_id ON users (noirlab_id);
CREATE INDEX ix_users_username ON users (username);
CREATE INDEX ix_users_cookie ON users (cookie);

CREATE TABLE usagelog (
    id BIGSERIAL NOT NULL,
    utdatetime TIMESTAMP WITHOUT TIME ZONE,
    user_id INTEGER,
    ip_address TEXT,
    user_agent TEXT,
    referer TEXT,
    method TEXT,
    uri TEXT,
    this TEXT,
    bytes BIGINT,
    status INTEGER,
    notes TEXT,
    PRIMARY KEY (id),
    FOREIGN KEY (user_id) REFERENCES users (id)        -- usagelog_user_id_fkey
);
CREATE INDEX ix_usagelog_utdatetime ON usagelog (utdatetime);
CREATE INDEX ix_usagelog_user_id ON usagelog (user_id);
CREATE INDEX ix_usagelog_ip_address ON usagelog (ip_address);
CREATE INDEX ix_usagelog_this ON usagelog (this);
CREATE INDEX ix_usagelog_status ON usagelog (status);

CREATE TABLE fileuploadlog (
    id SERIAL NOT NULL,
    usagelog_id BIGINT NOT NULL,
    ut_transfer_start TIMESTAMP WITHOUT TIME ZONE,
    ut_transfer_complete TIMESTAMP WITHOUT TIME ZONE,
    filename TEXT,
    path TEXT,
    size BIGINT,
    md5 TEXT,
    processed_cal BOOLEAN,
    destination TEXT,
    s3_ut_start TIMESTAMP WITHOUT TIME ZONE,
    s3_ut_end TIMESTAMP WITHOUT TIME ZONE,
    s3_ok BOOLEAN,
    file_ok BOOLEAN,
    notes TEXT,
    PRIMARY KEY (id),
    FOREIGN KEY (usagelog_id) REFERENCES usagelog (id) -- fileuploadlog_usagelog_id_fkey
);
CREATE INDEX ix_fileuploadlog_usagelog_id ON fileuploadlog (usagelog_id);
CREATE INDEX ix_fileuploadlog_ut_transfer_start ON fileuploadlog (ut_transfer_start);
CREATE INDEX ix_fileuploadlog_filename ON fileuploadlog (filename);

CREATE TABLE ingestqueue (
    id SERIAL NOT NULL,
    filename TEXT NOT NULL,
    path TEXT NOT NULL,
    inprogress BOOLEAN,
    fail_dt TIMESTAMP WITHOUT TIME ZONE,
    added TIMESTAMP WITHOUT TIME ZONE,
    force_md5 BOOLEAN,
    force BOOLEAN,
    after TIMESTAMP WITHOUT TIME ZONE,
    no_defer BOOLEAN,
    batch TEXT,
    sortkey TEXT,
    error TEXT,
    md5_before_header_update TEXT,
    md5_after_header_update TEXT,
    header_update TEXT,
    PRIMARY KEY (id),
    UNIQUE (filename, path, inprogress, fail_dt)  -- PG names it ingestqueue_filename_path_inprogress_fail_dt_key
);
CREATE INDEX ix_ingestqueue_filename ON ingestqueue (filename);
CREATE INDEX ix_ingestqueue_inprogress ON ingestqueue (inprogress);
CREATE INDEX ix_ingestqueue_fail_dt ON ingestqueue (fail_dt);
CREATE INDEX ix_ingestqueue_sortkey ON ingestqueue (sortkey);

CREATE TABLE fileopsqueue (
    id SERIAL NOT NULL,
    filename TEXT,
    inprogress BOOLEAN,
    response_required BOOLEAN,
    fail_dt TIMESTAMP WITHOUT TIME ZONE,
    added TIMESTAMP WITHOUT TIME ZONE,
    after TIMESTAMP WITHOUT TIME ZONE,
    sortkey TIMESTAMP WITHOUT TIME ZONE,          -- NB: timestamp, not text (= added)
    error TEXT,
    request TEXT NOT NULL,
    response TEXT,
    batch TEXT,                                    -- NB: no index on batch
    PRIMARY KEY (id)                               -- NB: no unique constraint at all
);
CREATE INDEX ix_fileopsqueue_inprogress ON fileopsqueue (inprogress);
CREATE INDEX ix_fileopsqueue_fail_dt ON fileopsqueue (fail_dt);
CREATE INDEX ix_fileopsqueue_sortkey ON fileopsqueue (sortkey);
