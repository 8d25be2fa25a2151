/* SWIG interface of the openmm-backmap plugin: openmm_backmap._plugin.backmapplugin.
 *
 * Built with SWIG >= 4.2 against the interface files OpenMM ships (OpenMM.libs/include/swig), so
 * BackmapTorchForce is a subclass of openmm.Force that System.addForce() accepts.
 */
%module backmapplugin

%import(module="openmm") "swig/OpenMMSwigHeaders.i"
%include "swig/typemaps.i"
%include <std_string.i>

%{
#include "BackmapTorchForce.h"
#include "OpenMM.h"
#include "OpenMMAmoeba.h"
#include "OpenMMDrude.h"
#include "openmm/RPMDIntegrator.h"
#include "openmm/RPMDMonteCarloBarostat.h"

/* Raise C++ errors as openmm.OpenMMException (falls back to Exception). */
static void backmapSetPythonError(const char* message) {
    PyObject* type = PyExc_Exception;
    PyObject* openmm = PyImport_ImportModule("openmm");
    PyObject* found = NULL;
    if (openmm != NULL) {
        found = PyObject_GetAttrString(openmm, "OpenMMException");
        Py_DECREF(openmm);
    }
    PyErr_Clear();
    if (found != NULL && PyType_Check(found))
        type = found;
    PyErr_SetString(type, message);
    Py_XDECREF(found);
}
%}

%pythoncode %{
import openmm
%}

%exception {
    try {
        $action
    } catch (std::exception& e) {
        backmapSetPythonError(e.what());
        SWIG_fail;
    }
}

/* Module bytes travel as Python bytes (not str: they are a zip archive). */
%typemap(in) const std::string& moduleBytes (std::string temp) {
    char* buffer = NULL;
    Py_ssize_t length = 0;
    if (PyBytes_Check($input)) {
        PyBytes_AsStringAndSize($input, &buffer, &length);
    } else if (PyByteArray_Check($input)) {
        buffer = PyByteArray_AsString($input);
        length = PyByteArray_Size($input);
    } else {
        PyErr_SetString(PyExc_TypeError, "the TorchScript module must be given as bytes");
        SWIG_fail;
    }
    temp.assign(buffer, length);
    $1 = &temp;
}
%typemap(freearg) const std::string& moduleBytes ""
%typemap(typecheck, precedence=SWIG_TYPECHECK_STRING) const std::string& moduleBytes {
    $1 = (PyBytes_Check($input) || PyByteArray_Check($input)) ? 1 : 0;
}
%typemap(out) const std::string& getModuleBytes {
    $result = PyBytes_FromStringAndSize($1->data(), $1->size());
}

#define OPENMM_EXPORT_BACKMAP
%ignore BackmapPlugin::BackmapTorchForce::GlobalParameterInfo;
%rename(_setModuleBytes) BackmapPlugin::BackmapTorchForce::setModuleBytes;
%rename(_cast) BackmapPlugin::BackmapTorchForce::cast;
%include "BackmapTorchForce.h"

%extend BackmapPlugin::BackmapTorchForce {
    void setModuleBytes(const std::string& moduleBytes) {
        self->setModuleBytes(moduleBytes);
    }

    %newobject fromBytes;
    /** Create a force from the bytes of a TorchScript file (as written by torch.jit.save) or of a
        compiled force package (.pt2, written by openmm-backmap compile). */
    static BackmapPlugin::BackmapTorchForce* fromBytes(const std::string& moduleBytes) {
        BackmapPlugin::BackmapTorchForce* force = new BackmapPlugin::BackmapTorchForce();
        force->setModuleBytes(moduleBytes);
        return force;
    }

    /* Returns a reference into the argument; the Python cast() below keeps the argument alive. */
    static BackmapPlugin::BackmapTorchForce& cast(OpenMM::Force& force) {
        BackmapPlugin::BackmapTorchForce* result = dynamic_cast<BackmapPlugin::BackmapTorchForce*>(&force);
        if (result == NULL)
            throw OpenMM::OpenMMException("this Force is not a BackmapTorchForce");
        return *result;
    }

    /** Whether an openmm.Force is a BackmapTorchForce. */
    static bool isinstance(OpenMM::Force& force) {
        return (dynamic_cast<BackmapPlugin::BackmapTorchForce*>(&force) != NULL);
    }

    %pythoncode %{
    @staticmethod
    def cast(force):
        """Cast an openmm.Force (e.g. from System.getForce() or XmlSerializer) to a BackmapTorchForce."""
        result = BackmapTorchForce._cast(force)
        result._castFrom = force  # the result points into force: keep it alive
        return result
    %}
}
